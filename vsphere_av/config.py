"""Settings: one TOML file (``--config`` / ``VSPHERE_AV_CONFIG``) plus environment overrides.

Called by ``cli.py`` (and tests) through :func:`load`; calls nothing but the file system.
Secrets come only from the environment or from files named in the config
(``password_file`` / ``password_env``), never inline in the TOML, and never appear in a
``repr``: :class:`Secret` hides them.

Environment: VSPHERE_AV_SERVER, VSPHERE_AV_USER, VSPHERE_AV_PASSWORD, VSPHERE_AV_GUEST_USER,
VSPHERE_AV_GUEST_PASSWORD, VSPHERE_AV_STATE_DIR, VSPHERE_AV_CA_FILE, VSPHERE_AV_THUMBPRINT,
VSPHERE_AV_INSECURE.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from vsphere_av.errors import ConfigError

MiB = 1024 * 1024


class Secret:
    """A password that never shows in repr, str, logs or errors."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself: pass it straight to the API that needs it."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class VcenterSettings:
    """How to reach and trust vCenter."""

    server: str = ""  # host, host:port
    port: int = 443
    user: str = ""
    password: Secret = field(default_factory=lambda: Secret(""))
    ca_file: str = ""
    thumbprint: str = ""  # SHA-256, colon-separated hex, normalised to upper case
    insecure: bool = False


@dataclass(frozen=True)
class GuestCredential:
    """Guest login for VMs whose name matches ``vm`` (a glob) and/or sit under ``folder``."""

    user: str
    password: Secret
    vm: str = ""
    folder: str = ""

    def matches(self, *, vm_name: str, folder_path: str) -> bool:
        """True when this entry applies to the VM."""
        if self.vm and not fnmatch.fnmatchcase(vm_name, self.vm):
            return False
        if self.folder:
            want = self.folder.strip("/")
            have = folder_path.strip("/")
            if not (have == want or have.startswith(want + "/")):
                return False
        return bool(self.vm or self.folder)


@dataclass(frozen=True)
class GuestSettings:
    """Default guest login plus per-VM overrides (first match wins)."""

    user: str = ""
    password: Secret = field(default_factory=lambda: Secret(""))
    credentials: tuple[GuestCredential, ...] = ()

    def for_vm(self, *, vm_name: str, folder_path: str = "") -> tuple[str, Secret]:
        """The (user, password) to use for this VM."""
        for cred in self.credentials:
            if cred.matches(vm_name=vm_name, folder_path=folder_path):
                return cred.user, cred.password
        return self.user, self.password


@dataclass(frozen=True)
class EngineSettings:
    """Scan engine limits."""

    max_file_size: int = 64 * MiB
    archive_max_depth: int = 3
    archive_max_members: int = 10_000
    archive_max_total_size: int = 512 * MiB
    archive_max_ratio: int = 100
    cache_max_entries: int = 1_000_000
    spool_threshold: int = 8 * MiB  # larger streams are spooled to a temporary file
    # An archive that exceeds a limit is a detection of its own (Heuristics.Limits.Exceeded,
    # as ClamAV's --alert-exceeds-max), so a zip bomb cannot hide what lies past the limit.
    alert_exceeds_max: bool = True


DEFAULT_EXCLUDES: tuple[str, ...] = (
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/var/run",
    "/var/lock",
    "/tmp/.X11-unix",
    "*/pagefile.sys",
    "*/hiberfil.sys",
    "*/swapfile.sys",
    "C:/System Volume Information",
    "C:/$Recycle.Bin",
)


@dataclass(frozen=True)
class ScanPolicy:
    """What a guest scan reads and what it does on a detection."""

    linux_roots: tuple[str, ...] = ("/",)
    windows_roots: tuple[str, ...] = ("C:\\",)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    default_excludes: tuple[str, ...] = DEFAULT_EXCLUDES
    max_file_size: int = 64 * MiB
    # A file over max_file_size makes the scan incomplete, unless skipping it is the policy.
    skip_large: bool = False
    action: str = "quarantine"  # report | quarantine | delete
    fallback_action: str = "delete"  # when the first action fails; "" for none
    per_host_limit: int = 4
    global_limit: int = 16
    share_across_vms: bool = True  # reuse verdicts of identical files in clones
    isolate_stale: bool = True


RELEASE_RULES = ("operator", "clean_rescan")


@dataclass(frozen=True)
class IsolationSettings:
    """When a VM cut off the network because it was found infected gets its vNICs back."""

    # "operator": only a rescan an operator asked for (scan VM) that is clean releases it;
    # "clean_rescan": any clean rescan does (a controller retry or a schedule too).
    release_infected: str = "operator"


@dataclass(frozen=True)
class TaggingSettings:
    """vSphere tags that mirror a VM's protection state (needs the vsphere-av-tagging role)."""

    enabled: bool = False
    category: str = "vsphere-av"    # created when missing: one tag per VM (single cardinality)
    infected_tag: str = "infected"  # on every VM whose state is infected, off once clean
    resync_interval: float = 600.0  # serve: seconds between full comparisons (drift, misses)

    @property
    def label(self) -> str:
        """The tag as people see it: "category/tag"."""
        return f"{self.category}/{self.infected_tag}"


@dataclass(frozen=True)
class SiemSettings:
    """Forwarding the audit log to a SIEM over syslog (``siem.py``); off while target is ""."""

    target: str = ""                 # tls://host:port (RFC 5425), tcp://host:port, udp://host:port
    format: str = "cef"              # cef | jsonl: the syslog message body
    framing: str = "octet-counting"  # tcp/tls: octet-counting (RFC 6587) | newline
    ca_file: str = ""                # tls: CA bundle; empty: the system's trust store
    insecure: bool = False           # tls without verification: only when set on purpose
    interval: float = 5.0            # seconds between forwarding rounds in serve


@dataclass(frozen=True)
class AccessSettings:
    """The ``[access]`` section: users and ``%groups`` per role (``access.py``)."""

    security_admins: tuple[str, ...] = ()
    infrastructure_admins: tuple[str, ...] = ()
    auditors: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        """True when any role lists anyone."""
        return bool(self.security_admins or self.infrastructure_admins or self.auditors)

    def members(self, role: str) -> tuple[str, ...]:
        """The entries of one role."""
        return tuple(getattr(self, role))


SYSLOG_PORTS = {"tls": 6514, "tcp": 601, "udp": 514}   # RFC 5425, RFC 6587, RFC 5426


def parse_syslog_target(text: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``tls|tcp|udp://host[:port]``; ConfigError when malformed."""
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if "@" in parts.netloc:
        raise ConfigError("siem.target must not carry a user or password (syslog has none)")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"siem.target {text!r}: {exc}") from exc
    if parts.scheme not in SYSLOG_PORTS or not parts.hostname or parts.path not in ("", "/") \
            or parts.query:
        raise ConfigError(f"siem.target {text!r} must look like tls://HOST:PORT "
                          "(or tcp:// or udp://)")
    return parts.scheme, parts.hostname, port or SYSLOG_PORTS[parts.scheme]


@dataclass(frozen=True)
class Settings:
    """Everything the product reads from configuration."""

    state_dir: Path
    vcenter: VcenterSettings = field(default_factory=VcenterSettings)
    guest: GuestSettings = field(default_factory=GuestSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    scan: ScanPolicy = field(default_factory=ScanPolicy)
    tagging: TaggingSettings = field(default_factory=TaggingSettings)
    siem: SiemSettings = field(default_factory=SiemSettings)
    access: AccessSettings = field(default_factory=AccessSettings)
    isolation: IsolationSettings = field(default_factory=IsolationSettings)
    extra: Mapping[str, Any] = field(default_factory=dict)  # sections other modules read

    def with_state_dir(self, path: Path) -> Settings:
        """A copy with another state directory."""
        return replace(self, state_dir=path)


ACTIONS = ("report", "quarantine", "delete")
_THUMB_RE = re.compile(r"^([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}$")


def default_state_dir() -> Path:
    """Per-user state directory: $XDG_STATE_HOME/vsphere-av or ~/.local/state/vsphere-av."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "vsphere-av"


def normalise_thumbprint(value: str) -> str:
    """Upper-case colon-separated SHA-256; ConfigError when malformed."""
    value = value.strip()
    if not _THUMB_RE.match(value):
        raise ConfigError(
            "thumbprint must be a SHA-256 fingerprint: 32 colon-separated hex bytes (AA:BB:...)"
        )
    return value.upper()


def _read_secret(section: Mapping[str, Any], where: str, env: Mapping[str, str]) -> Secret:
    if "password" in section:
        raise ConfigError(
            f"{where}: inline passwords are not allowed; use password_file or password_env"
        )
    if section.get("password_env"):
        name = str(section["password_env"])
        if name not in env:
            raise ConfigError(f"{where}: environment variable {name} is not set")
        return Secret(env[name])
    if section.get("password_file"):
        path = Path(str(section["password_file"])).expanduser()
        try:
            return Secret(path.read_text(encoding="utf-8").rstrip("\r\n"))
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read password_file {path}: {exc.strerror}") from exc
    return Secret("")


_KIND_WORDS: Mapping[type, str] = {tuple: "a list of strings", float: "a number",
                                   bool: "true or false", int: "a whole number",
                                   str: "a string"}


def _typed_value(value: Any, kind: type, name: str) -> Any:
    """``value`` if it is of ``kind``, else ConfigError "NAME must be ..."."""
    if kind is tuple:  # a string or a list of strings, as a tuple
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif kind is float:  # any number, kept as given
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{name} must be {_KIND_WORDS.get(kind, kind.__name__)}")


def typed_section(
    section: Any, kinds: Mapping[str, type], where: str, *, ignore_unknown: bool = False
) -> dict[str, Any]:
    """The values a TOML table sets, each checked against ``kinds`` (key -> type).

    ConfigError when ``section`` is not a table, names a key missing from ``kinds`` (unless
    ``ignore_unknown``) or holds a value of the wrong type ("appliances.ssh_port must be a
    whole number").
    Kinds: ``str``, ``int`` (not a bool), ``bool``, ``float`` (any number), ``tuple`` (a string
    or a list of strings, returned as a tuple) and ``object`` (anything).
    """
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where} must be a table")
    unknown = set(section) - set(kinds)
    if unknown and not ignore_unknown:
        raise ConfigError(f"{where}: unknown setting(s): {', '.join(sorted(unknown))}")
    return {
        key: _typed_value(section[key], kind, f"{where}.{key}")
        for key, kind in kinds.items()
        if key in section
    }


def _typed(section: Mapping[str, Any], key: str, kind: type, where: str, default: Any) -> Any:
    return _typed_value(section[key], kind, f"{where}.{key}") if key in section else default


def _parse_server(raw: str) -> tuple[str, int, str, str]:
    """host[:port] or an SDK URL (https://user:pass@host:port/sdk) -> host, port, user, password."""
    raw = raw.strip()
    if "://" in raw:
        parts = urlsplit(raw)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(
                f"server URL must be https://host[:port]/sdk, got scheme {parts.scheme!r}"
            )
        return (
            parts.hostname,
            parts.port or 443,
            unquote(parts.username or ""),
            unquote(parts.password or ""),
        )
    host, _, port = raw.rpartition(":") if raw.count(":") == 1 else (raw, "", "")
    if not port:
        return raw, 443, "", ""
    if not port.isdigit():
        raise ConfigError(f"server port must be a number: {raw!r}")
    return host, int(port), "", ""


def load(
    *,
    config_file: str | os.PathLike[str] | None = None,
    insecure: bool = False,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Read the TOML file (if any), apply environment overrides, validate everything."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if config_file:
        path = Path(config_file).expanduser()
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc

    state_dir = Path(
        env.get("VSPHERE_AV_STATE_DIR") or data.get("state_dir") or default_state_dir()
    )

    vc = data.get("vcenter", {})
    server_raw = env.get("VSPHERE_AV_SERVER") or _typed(vc, "server", str, "vcenter", "")
    host, port, url_user, url_password = (
        _parse_server(server_raw) if server_raw else ("", 443, "", "")
    )
    password = _read_secret(vc, "vcenter", env)
    if env.get("VSPHERE_AV_PASSWORD"):
        password = Secret(env["VSPHERE_AV_PASSWORD"])
    elif not password and url_password:
        password = Secret(url_password)
    thumb = env.get("VSPHERE_AV_THUMBPRINT") or _typed(vc, "thumbprint", str, "vcenter", "")
    ca_file = env.get("VSPHERE_AV_CA_FILE") or _typed(vc, "ca_file", str, "vcenter", "")
    if ca_file and not Path(ca_file).expanduser().is_file():
        raise ConfigError(f"CA file not found: {ca_file}")
    is_insecure = (
        insecure
        or env.get("VSPHERE_AV_INSECURE", "") in ("1", "true", "yes")
        or _typed(vc, "insecure", bool, "vcenter", False)
    )
    vcenter = VcenterSettings(
        server=host,
        port=port,
        user=env.get("VSPHERE_AV_USER") or _typed(vc, "user", str, "vcenter", "") or url_user,
        password=password,
        ca_file=str(Path(ca_file).expanduser()) if ca_file else "",
        thumbprint=normalise_thumbprint(thumb) if thumb else "",
        insecure=bool(is_insecure),
    )

    gs = data.get("guest", {})
    creds = []
    for i, entry in enumerate(gs.get("credentials", [])):
        where = f"guest.credentials[{i}]"
        if not isinstance(entry, dict) or not entry.get("user"):
            raise ConfigError(f"{where} needs a user")
        if not entry.get("vm") and not entry.get("folder"):
            raise ConfigError(f"{where} needs vm (a name pattern) or folder")
        creds.append(
            GuestCredential(
                user=str(entry["user"]),
                password=_read_secret(entry, where, env),
                vm=str(entry.get("vm", "")),
                folder=str(entry.get("folder", "")),
            )
        )
    guest_password = _read_secret(gs, "guest", env)
    if env.get("VSPHERE_AV_GUEST_PASSWORD"):
        guest_password = Secret(env["VSPHERE_AV_GUEST_PASSWORD"])
    guest = GuestSettings(
        user=env.get("VSPHERE_AV_GUEST_USER") or _typed(gs, "user", str, "guest", ""),
        password=guest_password,
        credentials=tuple(creds),
    )

    engine = EngineSettings(
        **typed_section(
            data.get("engine", {}),
            {**dict.fromkeys(EngineSettings.__dataclass_fields__, int),
             "alert_exceeds_max": bool},
            "engine",
            ignore_unknown=True,
        )
    )
    for name in engine.__dataclass_fields__:
        if name != "alert_exceeds_max" and getattr(engine, name) < 0:
            raise ConfigError(f"engine.{name} must not be negative")

    kinds = {
        "linux_roots": tuple,
        "windows_roots": tuple,
        "include": tuple,
        "exclude": tuple,
        "default_excludes": tuple,
        "max_file_size": int,
        "action": str,
        "fallback_action": str,
        "per_host_limit": int,
        "global_limit": int,
        "share_across_vms": bool,
        "isolate_stale": bool,
        "skip_large": bool,
    }
    scan = ScanPolicy(**typed_section(data.get("scan", {}), kinds, "scan"))
    if scan.action not in ACTIONS:
        raise ConfigError(f"scan.action must be one of {', '.join(ACTIONS)}")
    if scan.fallback_action not in (*ACTIONS, ""):
        raise ConfigError(f"scan.fallback_action must be one of {', '.join(ACTIONS)} or empty")
    if scan.per_host_limit < 1 or scan.global_limit < 1:
        raise ConfigError("scan.per_host_limit and scan.global_limit must be at least 1")

    tagging = TaggingSettings(**typed_section(
        data.get("tagging", {}), {"enabled": bool, "category": str, "infected_tag": str,
                                  "resync_interval": float}, "tagging"))
    if tagging.resync_interval <= 0:
        raise ConfigError("tagging.resync_interval must be more than 0 seconds")
    for name in ("category", "infected_tag"):
        value = getattr(tagging, name)
        if not value.strip() or len(value) > 80:
            raise ConfigError(f"tagging.{name} must be 1 to 80 characters")

    siem = SiemSettings(**typed_section(
        data.get("siem", {}), {"target": str, "format": str, "framing": str, "ca_file": str,
                               "insecure": bool, "interval": float}, "siem"))
    if siem.format not in ("cef", "jsonl"):
        raise ConfigError("siem.format must be cef or jsonl")
    if siem.framing not in ("octet-counting", "newline"):
        raise ConfigError("siem.framing must be octet-counting or newline")
    if siem.interval <= 0:
        raise ConfigError("siem.interval must be more than 0 seconds")
    if siem.target:
        parse_syslog_target(siem.target)     # a malformed target fails now, not in the loop

    access = AccessSettings(**typed_section(
        data.get("access", {}), dict.fromkeys(AccessSettings.__dataclass_fields__, tuple),
        "access"))
    for role in AccessSettings.__dataclass_fields__:
        for entry in getattr(access, role):
            if not entry.strip("%").strip() or entry != entry.strip():
                raise ConfigError(f"access.{role}: {entry!r} is not a user or %group name")

    isolation = IsolationSettings(**typed_section(
        data.get("isolation", {}), {"release_infected": str}, "isolation"))
    if isolation.release_infected not in RELEASE_RULES:
        raise ConfigError(f"isolation.release_infected must be one of {', '.join(RELEASE_RULES)}")

    known = {"state_dir", "vcenter", "guest", "engine", "scan", "tagging", "siem", "access",
             "isolation"}
    extra = {k: v for k, v in data.items() if k not in known}
    return Settings(
        state_dir=state_dir, vcenter=vcenter, guest=guest, engine=engine, scan=scan,
        tagging=tagging, siem=siem, access=access, isolation=isolation, extra=extra
    )
