"""The appliance image a deploy imports: an OVF descriptor, or an OVA checked against its manifest.

Called by ``vsphere.appliances`` through :class:`ConfiguredImage` (the deploy: which
descriptor to import, unpacked where, and the OVF property values to set), which
``fleet.manager.open_manager`` hands it; by ``fleet.plan`` / ``fleet.manager`` (the image id
each appliance records in extraConfig ``vsphere-av.image``, which ``appliances upgrade``
compares; the warning while the bundled placeholder is configured). Calls the file system
(``tarfile``, ``hashlib``), paramiko (the controller's public key) and
``engine.remote.load_token``.

``[appliances] ova`` (a built image, ``make appliance``) wins over ``ovf``. An OVA is a tar
whose first member is the descriptor; it must hold a manifest (``.mf``) with a SHA-256 line
for every other member, as ``appliance/build.sh`` writes it. Nothing is deployed from an OVA
until every member matched its manifest line: a mismatch, a missing line or a member that
would leave its folder is one :class:`~vsphere_av.errors.ApplianceError` line.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from vsphere_av.config import DEFAULT_OVF, ApplianceSettings
from vsphere_av.errors import ApplianceError
from vsphere_av.models import ADDRESS_KEY

IMAGE_KEY = "vsphere-av.image"      # extraConfig: "sha256:<hex>" of the image deployed
# OVF properties of the built appliance image (appliance/appliance.ovf.in) that a deploy
# fills from the controller's own settings; the image's setup service reads them at boot.
SSH_KEY_PROPERTY = "vsphere_av.ssh_authorized_key"
TOKEN_PROPERTY = "vsphere_av.engine_token"
MAX_MEMBERS = 16                     # an OVA holds a descriptor, a manifest and a few disks
MAX_OVA_BYTES = 64 * 1024 ** 3
_MANIFEST_LINE = re.compile(r"^(\w+)\s?\(([^)]+)\)\s*=\s*([0-9A-Fa-f]+)$")
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ImageRef:
    """The configured image: its file, whether it is an OVA, whether it is the placeholder."""

    path: Path
    ova: bool
    placeholder: bool

    @classmethod
    def from_settings(cls, settings: ApplianceSettings) -> ImageRef:
        """``ova`` when set, else ``ovf`` (default: the bundled placeholder)."""
        if settings.ova:
            return cls(Path(settings.ova).expanduser(), ova=True, placeholder=False)
        path = Path(settings.ovf).expanduser()
        return cls(path, ova=False, placeholder=_same(path, Path(DEFAULT_OVF)))


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def placeholder_warning(settings: ApplianceSettings) -> str:
    """A one-line warning while the bundled placeholder is what a deploy would import."""
    if settings.source != "ovf" or not ImageRef.from_settings(settings).placeholder:
        return ""
    return ("appliances.ovf is the bundled placeholder (a 512-byte disk for the simulator and "
            "tests, not a bootable appliance): set appliances.ova to a built image")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_ids: dict[tuple[str, int, int], str] = {}
_ids_lock = threading.Lock()


def image_id(settings: ApplianceSettings) -> str:
    """``sha256:<hex>`` of the configured OVA (or OVF descriptor); "" for template deploys.

    Remembered per (path, size, mtime) so a serve loop does not hash a 230 MiB OVA each round.
    """
    if settings.source != "ovf":
        return ""
    ref = ImageRef.from_settings(settings)
    try:
        stat = ref.path.stat()
        key = (str(ref.path.resolve()), stat.st_size, stat.st_mtime_ns)
        with _ids_lock:
            known = _ids.get(key)
        if known is None:
            known = "sha256:" + file_sha256(ref.path)
            with _ids_lock:
                _ids[key] = known
    except OSError as exc:
        raise ApplianceError(f"cannot read the appliance image {ref.path}: "
                             f"{exc.strerror}") from exc
    return known


def read_manifest(text: str, *, name: str) -> dict[str, str]:
    """File name -> lower-case SHA-256 hex from an OVF manifest; other algorithms refused."""
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE.match(line.strip())
        if match is None:
            raise ApplianceError(f"OVA manifest {name} line {number} is malformed")
        algorithm, member, digest = match.groups()
        if algorithm.upper() != "SHA256" or len(digest) != 64:
            raise ApplianceError(f"OVA manifest {name} line {number}: {algorithm} is not "
                                 "SHA-256")
        out[member] = digest.lower()
    return out


def unpack_ova(ova: Path, into: Path) -> Path:
    """Unpack ``ova`` into ``into``, check every member against the manifest, return the
    descriptor's path; ApplianceError (one line) on anything that does not match."""
    try:
        size = ova.stat().st_size
        if size > MAX_OVA_BYTES:
            raise ApplianceError(f"OVA {ova.name} is larger than 64 GiB")
        with tarfile.open(ova, "r:") as tar:
            members = tar.getmembers()
            if not members or len(members) > MAX_MEMBERS:
                raise ApplianceError(f"OVA {ova.name}: {len(members)} members (1 to "
                                     f"{MAX_MEMBERS} expected)")
            for member in members:
                if not member.isfile() or "/" in member.name or member.name.startswith("."):
                    raise ApplianceError(f"OVA {ova.name}: member {member.name!r} is not a "
                                         "plain file at the top level")
            names = [m.name for m in members]
            if len(set(names)) != len(names):
                raise ApplianceError(f"OVA {ova.name}: a member name appears twice")
            if not names[0].endswith(".ovf"):
                raise ApplianceError(f"OVA {ova.name}: the first member is {names[0]!r}, not "
                                     "the OVF descriptor")
            manifests = [n for n in names if n.endswith(".mf")]
            if len(manifests) != 1:
                raise ApplianceError(f"OVA {ova.name}: no SHA-256 manifest (.mf)"
                                     if not manifests else f"OVA {ova.name}: several manifests")
            tar.extractall(into, filter="data")
    except (OSError, tarfile.TarError) as exc:
        raise ApplianceError(f"cannot unpack OVA {ova.name}: {exc}") from exc
    manifest = read_manifest((into / manifests[0]).read_text(encoding="utf-8",
                                                             errors="replace"),
                             name=manifests[0])
    for name in names:
        if name == manifests[0] or name.endswith(".cert"):
            continue
        want = manifest.get(name)
        if want is None:
            raise ApplianceError(f"OVA {ova.name}: {name} is not in the manifest")
        if file_sha256(into / name) != want:
            raise ApplianceError(f"OVA {ova.name}: {name} does not match its SHA-256 in "
                                 f"{manifests[0]}")
    missing = sorted(set(manifest) - set(names))
    if missing:
        raise ApplianceError(f"OVA {ova.name}: the manifest names {missing[0]}, which the "
                             "OVA does not hold")
    return into / names[0]


@contextmanager
def descriptor(settings: ApplianceSettings) -> Iterator[Path]:
    """The OVF descriptor to import (its disks beside it) while the block runs: the
    configured ``ovf`` itself, or the checked contents of ``ova`` in a temporary directory
    that is removed afterwards (the OVA is checked again for every deploy: it may change)."""
    ref = ImageRef.from_settings(settings)
    if not ref.ova:
        yield ref.path
        return
    with tempfile.TemporaryDirectory(prefix="vsphere-av-ova-") as work:
        yield unpack_ova(ref.path, Path(work))


def declared_properties(descriptor: str) -> set[str]:
    """The ``ovf:key`` of every property an OVF descriptor declares."""
    return set(re.findall(r'<Property\b[^>]*\bovf:key="([^"]+)"', descriptor))


def public_key_line(key_file: str) -> str:
    """The OpenSSH public key line of the controller's private key file."""
    import paramiko

    try:
        key = paramiko.PKey.from_path(Path(key_file).expanduser())
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise ApplianceError(f"cannot read the SSH key {key_file}: {exc}") from exc
    return f"{key.get_name()} {key.get_base64()} vsphere-av-controller"


def ovf_properties(settings: ApplianceSettings, extra_config: Mapping[str, str],
                   declared: set[str]) -> dict[str, str]:
    """The OVF properties a deploy sets: the pool address (when one was given), and, when the
    descriptor declares them (the built image does, the placeholder does not), the controller's
    SSH public key and the engine token, so a new appliance trusts this controller and no one
    else from its first boot. The token is a secret: it goes only into the import spec."""
    from vsphere_av.engine.remote import load_token

    values: dict[str, str] = {}
    if extra_config.get(ADDRESS_KEY):
        values[ADDRESS_KEY] = extra_config[ADDRESS_KEY]
    if SSH_KEY_PROPERTY in declared and settings.ssh_key_file:
        values[SSH_KEY_PROPERTY] = public_key_line(settings.ssh_key_file)
    if TOKEN_PROPERTY in declared and settings.engine_token_file:
        values[TOKEN_PROPERTY] = load_token(token_file=settings.engine_token_file)
    return values


class ConfiguredImage:
    """The ``[appliances]`` image as the adapter imports it (a ``models.ApplianceImage``)."""

    def __init__(self, settings: ApplianceSettings) -> None:
        self._settings = settings

    def __repr__(self) -> str:
        return f"ConfiguredImage({ImageRef.from_settings(self._settings).path})"

    def descriptor(self) -> AbstractContextManager[Path]:
        """See :func:`descriptor`."""
        return descriptor(self._settings)

    def properties(self, *, extra_config: Mapping[str, str], descriptor: str
                   ) -> dict[str, str]:
        """See :func:`ovf_properties`."""
        return ovf_properties(self._settings, extra_config, declared_properties(descriptor))
