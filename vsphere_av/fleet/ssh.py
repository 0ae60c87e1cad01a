"""SSH management of the appliances (paramiko): signatures push, engine restart.

Called by the controller (``appliances`` CLI / ``serve`` loop) for each appliance whose
management address the vSphere adapter reported; calls paramiko (SSH, SFTP), the
known-hosts file in the state directory and the audit log. The engine service itself is
reached directly (``engine.remote.EngineClient``), for scans and health checks alike.

Trust rules:
- Keys only: ``key_file`` is the controller's private key; no password, no agent, no
  ``~/.ssh`` lookup. (Encrypted private keys are not supported: protect the file instead.)
- Host keys are pinned at first contact in ``<state_dir>/known_hosts`` (an audit entry
  records the fingerprint). A different key later is refused with
  :class:`errors.HostKeyMismatch` and an audit entry, before any authentication happens. To
  accept a re-imaged appliance an administrator removes its line with ``ssh-keygen -R``.

Signature push: the controller's active version directory (``signatures/vNNNN``: manifest,
compiled rules, hash list) is packed into a deterministic tar streamed through SFTP to
``<remote_state_dir>/signatures/incoming/``, its SHA-256 is computed on the appliance with
``sha256sum`` and compared, then it is unpacked to ``signatures/vNNNN`` and made active by
replacing ``signatures/state.json`` atomically (SFTP posix-rename). The engine service
re-reads ``state.json`` before each scan, so no restart is needed for new signatures.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import stat
import tarfile
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from vsphere_av.errors import ApplianceError, HostKeyMismatch
from vsphere_av.models import Audit

MAX_OUTPUT = 1024 * 1024
MAX_STATE_JSON = 64 * 1024
_KNOWN_HOSTS_LOCK = threading.Lock()


def fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:<base64>`` as OpenSSH prints it."""
    import base64

    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    """The known_hosts entry name OpenSSH uses for host:port."""
    return host if port == 22 else f"[{host}]:{port}"


@dataclass(frozen=True)
class CommandResult:
    """Exit status and (bounded) output of one remote command."""

    status: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class PushResult:
    """What :meth:`ApplianceSsh.push_signatures` did."""

    version: int
    sha256: str          # of the tar that travelled
    size: int
    content_hash: str    # the manifest's hash of the signature content
    installed: bool      # False when the appliance already had this version


class _PinFirstContact(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]
    """Trust on first use: record the key in our known_hosts and the audit log."""

    def __init__(self, owner: ApplianceSsh) -> None:
        self.owner = owner

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        self.owner._pin(key)


class ApplianceSsh:
    """One SSH connection to one appliance; use as a context manager."""

    def __init__(self, *, host: str, port: int = 22, user: str, key_file: str | os.PathLike[str],
                 state_dir: str | os.PathLike[str], audit: Audit, actor: str,
                 appliance: str = "", timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.key_file = Path(key_file)
        self.known_hosts = Path(state_dir) / "known_hosts"
        self.audit = audit
        self.actor = actor
        self.appliance = appliance or host
        self.timeout = timeout
        self._client: paramiko.SSHClient | None = None

    def __repr__(self) -> str:
        return f"ApplianceSsh({self.user}@{self.host}:{self.port}, appliance={self.appliance!r})"

    # -- connection ------------------------------------------------------------------------
    def __enter__(self) -> ApplianceSsh:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _details(self, **extra: Any) -> dict[str, Any]:
        return {"appliance": self.appliance, "address": self.host, "port": self.port, **extra}

    def _load_known(self) -> paramiko.HostKeys:
        keys = paramiko.HostKeys()
        if self.known_hosts.exists():
            try:
                keys.load(str(self.known_hosts))
            except (OSError, paramiko.SSHException) as exc:
                raise ApplianceError(f"cannot read {self.known_hosts}: {exc}") from exc
        return keys

    def _pin(self, key: paramiko.PKey) -> None:
        name = known_hosts_name(self.host, self.port)
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with _KNOWN_HOSTS_LOCK, open(self.known_hosts.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            keys = self._load_known()
            existing = keys.lookup(name)
            if existing and key.get_name() in existing:
                if existing[key.get_name()] != key:   # raced with another pin: refuse
                    self._mismatch(key, existing[key.get_name()])
                return
            if existing:   # the host is pinned with another key type: a different key
                self._mismatch(key, next(iter(existing.values())))
            keys.add(name, key.get_name(), key)
            tmp = self.known_hosts.with_name(f".known_hosts.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
            keys.save(str(tmp))
            os.replace(tmp, self.known_hosts)
        self.audit.append(actor=self.actor, action="appliance.ssh.host_key_pinned",
                          details=self._details(key_type=key.get_name(),
                                                fingerprint=fingerprint(key)))

    def forget_host_key(self, *, reason: str) -> bool:
        """Remove this address's pinned host key (the appliance behind it was destroyed by
        us, so a new one may get the address); audited. False when nothing was pinned."""
        name = known_hosts_name(self.host, self.port)
        if not self.known_hosts.exists():
            return False
        with _KNOWN_HOSTS_LOCK, open(self.known_hosts.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            keys = self._load_known()
            existing = keys.lookup(name)
            if not existing:
                return False
            kept = paramiko.HostKeys()
            for host_name in keys:
                if host_name != name:
                    for key_type, key in keys[host_name].items():
                        kept.add(host_name, key_type, key)
            tmp = self.known_hosts.with_name(f".known_hosts.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
            kept.save(str(tmp))
            os.replace(tmp, self.known_hosts)
        self.audit.append(actor=self.actor, action="appliance.ssh.host_key_forgotten",
                          details=self._details(fingerprints=[fingerprint(k) for k in
                                                              existing.values()],
                                                reason=reason))
        return True

    def _mismatch(self, got: paramiko.PKey, expected: paramiko.PKey) -> None:
        self.audit.append(actor=self.actor, action="appliance.ssh.host_key_mismatch",
                          details=self._details(expected=fingerprint(expected),
                                                presented=fingerprint(got)))
        raise HostKeyMismatch(
            f"SSH host key of appliance {self.appliance} ({self.host}:{self.port}) changed: "
            f"pinned {fingerprint(expected)}, presented {fingerprint(got)}; refusing to connect "
            f"(if the appliance was re-imaged, remove its entry from {self.known_hosts})")

    def connect(self) -> None:
        """Open the SSH connection (key auth, pinned host key)."""
        if not self.key_file.is_file():
            raise ApplianceError(f"SSH key file not found: {self.key_file}")
        client = paramiko.SSHClient()
        keys = self._load_known()
        name = known_hosts_name(self.host, self.port)
        for key_type, key in (keys.lookup(name) or {}).items():
            client.get_host_keys().add(name, key_type, key)
        client.set_missing_host_key_policy(_PinFirstContact(self))
        try:
            client.connect(self.host, port=self.port, username=self.user,
                           key_filename=str(self.key_file), look_for_keys=False,
                           allow_agent=False, timeout=self.timeout,
                           banner_timeout=self.timeout, auth_timeout=self.timeout)
        except paramiko.BadHostKeyException as exc:
            client.close()
            self._mismatch(exc.key, exc.expected_key)
        except HostKeyMismatch:
            client.close()
            raise
        except paramiko.AuthenticationException as exc:
            client.close()
            raise ApplianceError(f"SSH key authentication to {self.user}@{self.host}:{self.port} "
                                 f"failed") from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            raise ApplianceError(f"SSH connection to {self.host}:{self.port} failed: "
                                 f"{exc or type(exc).__name__}") from exc
        self._client = client

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def client(self) -> paramiko.SSHClient:
        if self._client is None:
            raise ApplianceError("SSH connection is not open")
        return self._client

    # -- commands --------------------------------------------------------------------------
    def run(self, argv: Sequence[str] | str, *, timeout: float | None = None) -> CommandResult:
        """Run one command (argv is shell-quoted); bounded output, exit status returned."""
        command = argv if isinstance(argv, str) else " ".join(shlex.quote(a) for a in argv)
        try:
            stdin, stdout, stderr = self.client.exec_command(command,
                                                              timeout=timeout or self.timeout * 6)
            stdin.close()
            out = stdout.read(MAX_OUTPUT)
            err = stderr.read(MAX_OUTPUT)
            status = stdout.channel.recv_exit_status()
        except (TimeoutError, paramiko.SSHException, OSError) as exc:
            raise ApplianceError(f"remote command on {self.appliance} failed: "
                                 f"{exc or type(exc).__name__}") from exc
        return CommandResult(status, out.decode(errors="replace"), err.decode(errors="replace"))

    def _check(self, argv: Sequence[str] | str, what: str) -> CommandResult:
        result = self.run(argv)
        if result.status != 0:
            first = (result.stderr.strip() or result.stdout.strip()).splitlines()[:1]
            raise ApplianceError(f"{what} on {self.appliance} failed (exit {result.status})"
                                 + (f": {first[0]}" if first else ""))
        return result

    def restart_engine(self, *, command: str) -> None:
        """Restart the engine service with ``command`` (e.g. ``sudo -n systemctl restart X``)."""
        self._check(command, "engine restart")
        self.audit.append(actor=self.actor, action="appliance.engine.restarted",
                          details=self._details(command=command))

    # -- signatures --------------------------------------------------------------------------
    def push_signatures(self, *, version_dir: str | os.PathLike[str],
                        remote_state_dir: str) -> PushResult:
        """Copy one signature version to the appliance, verify its SHA-256 there, activate it."""
        version_dir = Path(version_dir)
        try:
            manifest = json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))
            version = int(manifest["version"])
            content_hash = str(manifest["hash"])
        except (OSError, ValueError, KeyError) as exc:
            raise ApplianceError(f"{version_dir} is not a signature version: {exc}") from exc
        name = f"v{version:04d}"
        sigdir = remote_state_dir.rstrip("/") + "/signatures"
        incoming = sigdir + "/incoming"
        sftp = self.client.open_sftp()
        try:
            self._sftp_makedirs(sftp, incoming)
            remote_manifest = self._sftp_read_json(sftp, f"{sigdir}/{name}/manifest.json")
            installed = False
            with tempfile.TemporaryFile() as packed:
                digest, size = _pack(version_dir, name, packed)
                if remote_manifest is None:
                    part = f"{incoming}/{name}.{digest[:16]}.tar.part"
                    packed.seek(0)
                    try:
                        sftp.putfo(packed, part, file_size=size, confirm=True)
                    except (OSError, paramiko.SSHException) as exc:
                        raise ApplianceError(f"SFTP upload to {self.appliance} failed: "
                                             f"{exc}") from exc
                    try:
                        self._verify_remote(part, digest, version)
                        tmp = f"{sigdir}/.{name}.push.tmp"
                        self._check(f"rm -rf {shlex.quote(tmp)} && mkdir -p {shlex.quote(tmp)} && "
                                    f"tar -xf {shlex.quote(part)} -C {shlex.quote(tmp)} "
                                    f"--strip-components=1 --no-same-owner && "
                                    f"mv -T {shlex.quote(tmp)} {shlex.quote(sigdir + '/' + name)}",
                                    "unpacking signatures")
                    finally:
                        with contextlib.suppress(OSError):
                            sftp.remove(part)
                    installed = True
                    remote_manifest = self._sftp_read_json(sftp, f"{sigdir}/{name}/manifest.json")
            if remote_manifest is None or remote_manifest.get("hash") != content_hash:
                self.audit.append(actor=self.actor, action="appliance.signatures.conflict",
                                  details=self._details(version=version))
                raise ApplianceError(f"appliance {self.appliance} has a different signature "
                                     f"version {version} (content hash differs); not activated")
            self._activate(sftp, sigdir, version)
        finally:
            sftp.close()
        self.audit.append(actor=self.actor, action="appliance.signatures.pushed",
                          details=self._details(version=version, sha256=digest, size=size,
                                                content_hash=content_hash, installed=installed))
        return PushResult(version=version, sha256=digest, size=size, content_hash=content_hash,
                          installed=installed)

    def _verify_remote(self, path: str, digest: str, version: int) -> None:
        result = self._check(["sha256sum", path], "checksum")
        remote = result.stdout.split(" ", 1)[0].strip().lower()
        if remote != digest:
            self.audit.append(actor=self.actor, action="appliance.signatures.checksum_mismatch",
                              details=self._details(version=version, expected=digest,
                                                    found=remote[:64]))
            raise ApplianceError(f"signature bundle v{version} arrived damaged on "
                                 f"{self.appliance}: SHA-256 {remote[:16]}... != {digest[:16]}...")

    def _activate(self, sftp: paramiko.SFTPClient, sigdir: str, version: int) -> None:
        state = self._sftp_read_json(sftp, f"{sigdir}/state.json") or {"active": 0, "history": []}
        previous = int(state.get("active", 0) or 0)
        if previous == version:
            return
        history = [int(v) for v in state.get("history", []) if isinstance(v, int)]
        if previous:
            history.append(previous)
        data = json.dumps({"active": version, "history": history[-100:]}).encode()
        tmp = f"{sigdir}/state.json.push.tmp"
        try:
            with sftp.open(tmp, "wb") as fh:
                fh.write(data)
            sftp.posix_rename(tmp, f"{sigdir}/state.json")
        except (OSError, paramiko.SSHException) as exc:
            raise ApplianceError(
                f"activating signatures on {self.appliance} failed: {exc}") from exc

    @staticmethod
    def _sftp_makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
        current = ""
        for part in (p for p in path.split("/") if p):
            current = f"{current}/{part}" if current or path.startswith("/") else part
            try:
                if not stat.S_ISDIR(sftp.stat(current).st_mode or 0):
                    raise ApplianceError(f"remote path {current} is not a directory")
            except FileNotFoundError:
                sftp.mkdir(current, mode=0o750)

    @staticmethod
    def _sftp_read_json(sftp: paramiko.SFTPClient, path: str) -> dict[str, Any] | None:
        try:
            with sftp.open(path, "rb") as fh:
                raw = fh.read(MAX_STATE_JSON + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ApplianceError(f"cannot read remote {path}: {exc}") from exc
        if len(raw) > MAX_STATE_JSON:
            raise ApplianceError(f"remote {path} is too large")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ApplianceError(f"remote {path} is not JSON") from exc
        return data if isinstance(data, dict) else None


def _pack(version_dir: Path, name: str, out: Any) -> tuple[str, int]:
    """Write a deterministic tar of ``version_dir`` as ``name/...`` into ``out``; (sha256, size)."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(version_dir.iterdir()):
            if not path.is_file():
                continue
            info = tarfile.TarInfo(f"{name}/{path.name}")
            info.size = path.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    out.flush()
    out.seek(0)
    digest = hashlib.sha256()
    size = 0
    for chunk in iter(lambda: out.read(1024 * 1024), b""):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


@contextlib.contextmanager
def connect(*, host: str, port: int, user: str, key_file: str, state_dir: str | os.PathLike[str],
            audit: Audit, actor: str, appliance: str = "") -> Iterator[ApplianceSsh]:
    """Open an :class:`ApplianceSsh` and close it afterwards."""
    conn = ApplianceSsh(host=host, port=port, user=user, key_file=key_file, state_dir=state_dir,
                        audit=audit, actor=actor, appliance=appliance)
    conn.connect()
    try:
        yield conn
    finally:
        conn.close()


__all__ = ["ApplianceSsh", "CommandResult", "PushResult", "connect", "fingerprint",
           "known_hosts_name"]
