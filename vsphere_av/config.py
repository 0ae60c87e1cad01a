"""Settings: one TOML file (``--config`` / ``VSPHERE_AV_CONFIG``) plus environment overrides.

Called by ``cli``, ``lab.demo`` (and tests) through :func:`load` (or :func:`parse` for a
mapping already read); calls nothing but the file system. Every section of the file is
declared here, as a frozen dataclass whose field types pydantic checks strictly (``"5"`` is
not 5, ``true`` is not 1, a section is a table): other modules read typed settings only
(``settings.appliances``, ``settings.controller``, ``settings.schedules``), never raw TOML.
Unknown sections and keys are errors with a "did you mean"; pydantic's ``ValidationError``
becomes one :class:`ConfigError` line that names the key (:func:`_plain`).

Secrets come only from the environment or from files named in the config
(``password_file`` / ``password_env``), never inline in the TOML (nor inside the server URL),
and never appear in a ``repr``: :class:`Secret` hides them.

Environment: VSPHERE_AV_SERVER, VSPHERE_AV_USER, VSPHERE_AV_PASSWORD, VSPHERE_AV_GUEST_USER,
VSPHERE_AV_GUEST_PASSWORD, VSPHERE_AV_STATE_DIR, VSPHERE_AV_CA_FILE, VSPHERE_AV_THUMBPRINT,
VSPHERE_AV_INSECURE.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import time
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin, get_type_hints
from urllib.parse import unquote, urlsplit

from croniter import croniter
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    with_config,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from vsphere_av.errors import ConfigError

MiB = 1024 * 1024
TiB = 1024 * 1024 * MiB
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




# -- field types: what pydantic checks; a failed check is one plain line (see _plain) -------

# Every table is closed: a key that is not declared is an error, not silently ignored.
_TABLE = ConfigDict(extra="forbid")


def _rule(check: Callable[[Any], bool], words: str) -> AfterValidator:
    """A validator that refuses a value with ``KEY words`` when ``check`` is false."""
    def validate(value: Any) -> Any:
        if not check(value):
            raise PydanticCustomError("config", words)
        return value
    return AfterValidator(validate)


def _parsed_by(parse: Callable[[Any], object]) -> AfterValidator:
    """A validator that runs ``parse`` on the value at load time (a malformed value fails
    now, not later in a loop or a deploy) and keeps the value; its ConfigError is the line."""
    def validate(value: Any) -> Any:
        try:
            parse(value)
        except ConfigError as exc:
            raise PydanticCustomError("config_line", str(exc)) from exc
        return value
    return AfterValidator(validate)


def _as_tuple(value: Any) -> Any:
    """A string or a list of strings as a tuple (TOML has lists; one name may stand alone)."""
    if isinstance(value, str):
        return (value,)
    return tuple(value) if isinstance(value, list) else value


Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
Names = Annotated[tuple[Str, ...], BeforeValidator(_as_tuple), Strict()]
Seconds = Annotated[float, Strict(), _rule(lambda s: s > 0, "must be more than 0 seconds")]
# Sizes in bytes: 0 would refuse every file; past 1 TiB is a unit mistake, not a limit.
Size = Annotated[int, Strict(), Field(gt=0, le=TiB)]
Count = Annotated[int, Strict(), Field(ge=1)]
Port = Annotated[int, Strict(), _rule(lambda p: 0 < p < 65536, "must be a TCP port")]


# -- sections ------------------------------------------------------------------------------


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


@with_config(_TABLE)
@dataclass(frozen=True)
class EngineSettings:
    """Scan engine limits (``[engine]``)."""

    max_file_size: Size = 64 * MiB
    # Each nesting level holds its own decompressor and up to spool_threshold bytes, so the
    # memory a file can pin grows with depth: 16 is past any real installer or backup (ClamAV
    # stops at 17) and 0 would open no archive at all.
    archive_max_depth: Annotated[int, Strict(), Field(ge=1, le=16)] = 3
    archive_max_members: Annotated[int, Strict(), Field(ge=1, le=1_000_000)] = 10_000
    archive_max_total_size: Size = 512 * MiB
    # Extracted bytes per compressed byte; 0 would flag every archive, and past 10,000:1 the
    # limit no longer stops a zip bomb (deflate alone reaches about 1,000:1).
    archive_max_ratio: Annotated[int, Strict(), Field(ge=1, le=10_000)] = 100
    cache_max_entries: Count = 1_000_000
    spool_threshold: Size = 8 * MiB  # larger streams are spooled to a temporary file
    # An archive that exceeds a limit is a detection of its own (Heuristics.Limits.Exceeded,
    # as ClamAV's --alert-exceeds-max), so a zip bomb cannot hide what lies past the limit.
    alert_exceeds_max: Bool = True


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

ACTIONS = ("report", "quarantine", "delete")
SCAN_VIA = ("auto", "disk", "guest")


@with_config(_TABLE)
@dataclass(frozen=True)
class ScanPolicy:
    """What a guest scan reads and what it does on a detection (``[scan]``)."""

    linux_roots: Names = ("/",)
    windows_roots: Names = ("C:\\",)
    include: Names = ()
    exclude: Names = ()
    default_excludes: Names = DEFAULT_EXCLUDES
    max_file_size: Size = 64 * MiB
    # A file over max_file_size makes the scan incomplete, unless skipping it is the policy.
    skip_large: Bool = False
    action: Annotated[Str, _rule(lambda a: a in ACTIONS, "must be one of report, quarantine, "
                                 "delete")] = "quarantine"
    # when the first action fails; "" for none
    fallback_action: Annotated[Str, _rule(lambda a: a in (*ACTIONS, ""), "must be one of "
                                          "report, quarantine, delete or empty")] = "delete"
    per_host_limit: Count = 4
    global_limit: Count = 16
    share_across_vms: Bool = True  # reuse verdicts of identical files in clones
    isolate_stale: Bool = True
    # How a VM's files are read: "guest" (Guest Operations), "disk" (its virtual disks,
    # no guest credentials or tools needed; a running VM under a temporary snapshot) or
    # "auto": disk for VMs powered off, without guest credentials or without running tools.
    via: Annotated[Str, _rule(lambda v: v in SCAN_VIA, "must be one of auto, disk, guest")] = "auto"
    # Quiesce the guest (VMware Tools flush its file systems) for the scan snapshot.
    disk_quiesce: Bool = False
    # Disk scans of VMs no appliance serves run in a pool of this many local worker
    # processes, reused across scans, one VM each at a time (app/disk_workers.py); 0 reads
    # and matches them in this process.
    disk_workers: Annotated[int, Strict(), Field(ge=0, le=256)] = 0


RELEASE_RULES = ("operator", "clean_rescan")


@with_config(_TABLE)
@dataclass(frozen=True)
class IsolationSettings:
    """When a VM cut off the network because it was found infected gets its vNICs back."""

    # "operator": only a rescan an operator asked for (scan VM) that is clean releases it;
    # "clean_rescan": any clean rescan does (a controller retry or a schedule too).
    release_infected: Annotated[Str, _rule(lambda r: r in RELEASE_RULES,
                                           "must be one of operator, clean_rescan")] = "operator"


_TagName = Annotated[Str, _rule(lambda n: bool(n.strip()) and len(n) <= 80,
                                "must be 1 to 80 characters")]


@with_config(_TABLE)
@dataclass(frozen=True)
class TaggingSettings:
    """vSphere tags that mirror a VM's protection state (needs the vsphere-av-tagging role)."""

    enabled: Bool = False
    category: _TagName = "vsphere-av"    # created when missing: one tag per VM (single cardinality)
    infected_tag: _TagName = "infected"  # on every VM whose state is infected, off once clean
    resync_interval: Seconds = 600.0     # serve: seconds between full comparisons (drift, misses)

    @property
    def label(self) -> str:
        """The tag as people see it: "category/tag"."""
        return f"{self.category}/{self.infected_tag}"


SYSLOG_PORTS = {"tls": 6514, "tcp": 601, "udp": 514}   # RFC 5425, RFC 6587, RFC 5426


def parse_syslog_target(text: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``tls|tcp|udp://host[:port]``; ConfigError when malformed.

    Called by ``siem.Forwarder`` and, through the ``[siem]`` declaration, by :func:`load`.
    """
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"siem.target {text!r}: {exc}") from exc
    if "@" in parts.netloc:
        raise ConfigError("siem.target must not carry a user or password (syslog has none)")
    if parts.scheme not in SYSLOG_PORTS or not parts.hostname or parts.path not in ("", "/") \
            or parts.query:
        raise ConfigError(f"siem.target {text!r} must look like tls://HOST:PORT "
                          "(or tcp:// or udp://)")
    return parts.scheme, parts.hostname, port or SYSLOG_PORTS[parts.scheme]


@with_config(_TABLE)
@dataclass(frozen=True)
class SiemSettings:
    """Forwarding the audit log to a SIEM over syslog (``store.siem``); off while target is ""."""

    # tls://host:port (RFC 5425), tcp://host:port, udp://host:port
    target: Annotated[Str, _parsed_by(lambda t: t and parse_syslog_target(t))] = ""
    # cef | jsonl: the syslog message body
    format: Annotated[Str, _rule(lambda f: f in ("cef", "jsonl"), "must be cef or jsonl")] = "cef"
    # tcp/tls: octet-counting (RFC 6587) | newline
    framing: Annotated[Str, _rule(lambda f: f in ("octet-counting", "newline"),
                                  "must be octet-counting or newline")] = "octet-counting"
    ca_file: Str = ""                # tls: CA bundle; empty: the system's trust store
    insecure: Bool = False           # tls without verification: only when set on purpose
    interval: Seconds = 5.0          # seconds between forwarding rounds in serve


def _role_members(entries: tuple[str, ...]) -> tuple[str, ...]:
    for entry in entries:
        name = entry.removeprefix("%")
        # ALL (or *) would hand a role to everyone: sudoers reads ALL as a keyword, and a
        # role check that matches any name is no check. Roles list people and %groups.
        if name in ("ALL", "*"):
            raise PydanticCustomError("config", ": {entry} is refused: name the people or "
                                      "a %group, not everyone", {"entry": repr(entry)})
        if not name.strip() or entry != entry.strip():
            raise PydanticCustomError("config", ": {entry} is not a user or %group name",
                                      {"entry": repr(entry)})
    return entries


_Members = Annotated[Names, AfterValidator(_role_members)]


@with_config(_TABLE)
@dataclass(frozen=True)
class AccessSettings:
    """The ``[access]`` section: users and ``%groups`` per role (``app.access``)."""

    security_admins: _Members = ()
    infrastructure_admins: _Members = ()
    auditors: _Members = ()

    @property
    def enabled(self) -> bool:
        """True when any role lists anyone."""
        return bool(self.security_admins or self.infrastructure_admins or self.auditors)

    def members(self, role: str) -> tuple[str, ...]:
        """The entries of one role."""
        return tuple(getattr(self, role))


def _listen(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if text and (not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536):
        raise PydanticCustomError("config", "must be HOST:PORT (e.g. 127.0.0.1:8480)")
    return text


@with_config(_TABLE)
@dataclass(frozen=True)
class ApiSettings:
    """The ``[api]`` section: the console served by ``serve`` (``vsphere_av/api``)."""

    listen: Annotated[Str, AfterValidator(_listen)] = ""   # HOST:PORT; "" = no API (default)
    tls_cert: Str = ""            # PEM certificate; required to listen beyond loopback
    tls_key: Str = ""             # its PEM private key
    max_body: Annotated[int, Strict(), Field(ge=256, le=16 * MiB)] = 65536   # request bytes


MAX_ADDRESSES = 4096
DEFAULT_OVF = str(Path(__file__).resolve().parent / "data" / "appliance-placeholder.ovf")


def expand_addresses(entries: Iterable[str]) -> list[str]:
    """Expand single addresses, ``A-B`` ranges and CIDR blocks, in order, without duplicates.

    Called by :meth:`ApplianceSettings.address_pool` (``appliances.Desired``) and when the
    ``[appliances]`` section is checked; ConfigError on a malformed or oversized entry.
    """
    out: list[str] = []
    seen: set[str] = set()

    def add(addr: Any) -> None:
        text = str(addr)
        if text not in seen:
            if len(out) >= MAX_ADDRESSES:
                raise ConfigError(f"appliances.addresses: more than {MAX_ADDRESSES} addresses")
            seen.add(text)
            out.append(text)

    for raw in entries:
        entry = raw.strip()
        try:
            if "/" in entry:
                net = ipaddress.ip_network(entry, strict=False)
                if net.num_addresses > MAX_ADDRESSES + 2:   # checked before expanding
                    raise ConfigError(f"appliances.addresses: {entry} is too large")
                for addr in (net.hosts() if net.num_addresses > 2 else net):
                    add(addr)
            elif "-" in entry:
                first_text, last_text = (p.strip() for p in entry.split("-", 1))
                first, last = ipaddress.ip_address(first_text), ipaddress.ip_address(last_text)
                if first.version != last.version or int(last) < int(first):
                    raise ConfigError(f"appliances.addresses: bad range {entry!r}")
                if int(last) - int(first) >= MAX_ADDRESSES:
                    raise ConfigError(f"appliances.addresses: {entry} is too large")
                for value in range(int(first), int(last) + 1):
                    add(ipaddress.ip_address(value))
            else:
                add(ipaddress.ip_address(entry))
        except ValueError as exc:
            raise ConfigError(
                f"appliances.addresses: {entry!r} is not an address, range or CIDR") from exc
    return out


@with_config(_TABLE)
@dataclass(frozen=True)
class ApplianceSettings:
    """The ``[appliances]`` section (``fleet.plan``, ``fleet.manager``)."""

    enabled: Bool = False
    source: Annotated[Str, _rule(lambda s: s in ("ovf", "template"),
                                 "must be ovf or template")] = "ovf"
    ovf: Str = DEFAULT_OVF                  # default: the bundled placeholder (tests only)
    ova: Str = ""                           # a built image (make appliance); wins over ovf
    template: Str = ""                      # template VM name when source = "template"
    clusters: Names = ()                    # cluster names; empty = every host
    name_prefix: Annotated[Str, _rule(lambda p: 0 < len(p) <= 40,
                                      "must be 1 to 40 characters")] = "vsphere-av-appliance-"
    datastore: Str = ""                     # empty: the host's local datastore, else its first
    network: Str = ""                       # empty: the host's first network
    folder: Str = ""                        # VM folder name; empty: the datacenter's VM folder
    # pool: "127.0.0.11", "127.0.0.11-127.0.0.40", CIDR
    addresses: Annotated[Names, _parsed_by(expand_addresses)] = ()
    ssh_user: Str = "vsphere-av"
    ssh_port: Port = 22
    ssh_key_file: Str = ""                  # private key (keys only, never passwords)
    engine_port: Port = 8443
    engine_token_file: Str = ""             # bearer token shared with the engine services
    engine_ca_file: Str = ""                # CA of the engine services' TLS certs: https if set
    restart_command: Str = "sudo -n systemctl restart vsphere-av-engine"  # run over SSH
    remote_state_dir: Str = "/var/lib/vsphere-av"   # the appliance engine's state directory
    # seconds `appliances upgrade` waits for a new appliance to be healthy before removing it
    upgrade_timeout: Seconds = 600.0
    # seconds between reconcile rounds inside `serve`
    interval: Annotated[int, Strict(), _rule(lambda i: i >= 1, "must be at least 1 second")] = 30

    def address_pool(self) -> list[str]:
        """Expand ``addresses`` into a list of IPv4/IPv6 strings (bounded)."""
        return expand_addresses(self.addresses)


@with_config(_TABLE)
@dataclass(frozen=True)
class ControllerSettings:
    """The ``[controller]`` section: timings of the serve loop (``ControllerOptions``)."""

    watch_wait: Seconds = 1.0                # WaitForUpdatesEx maxWaitSeconds
    event_poll: Seconds = 0.25               # seconds between event tail reads
    housekeeping: Seconds = 1.0
    retry_base: Seconds = 2.0                # first retry after a transient guest failure
    retry_max: Seconds = 60.0
    max_attempts: Count = 20
    reconnect_max: Seconds = 30.0            # backoff cap when vCenter is unreachable
    inventory_max_age: Seconds = 2.0
    containment_threads: Annotated[int, Strict(), Field(ge=1, le=256)] = 16
    shutdown_grace: Seconds = 20.0
    instant_on_full: Bool = False            # instant-on scans read every byte


def parse_duration(value: str | int | float) -> float:
    """'90', '30s', '15m', '2h' -> seconds; ConfigError when malformed or negative."""
    if isinstance(value, bool):
        raise ConfigError(f"bad duration {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        try:
            seconds = float(text[:-1]) * units[text[-1]] if text and text[-1] in units \
                else float(text)
        except ValueError as exc:
            raise ConfigError(f"bad duration {value!r}: use e.g. 90, 30s, 15m, 2h") from exc
    if seconds < 0:
        raise ConfigError(f"duration must not be negative: {value!r}")
    return seconds


def _duration(value: Any) -> Any:
    if isinstance(value, str | int | float):
        try:
            return parse_duration(value)
        except ConfigError as exc:
            raise PydanticCustomError("config", "must be a duration such as 90, 30s, 15m or "
                                      "2h") from exc
    return value


_HHMM = re.compile(r"^\d{2}:\d{2}$")


def _time_window(text: str) -> bool:
    """'HH:MM-HH:MM' with two valid times that differ ('' is no window)."""
    if not text:
        return True
    parts = [p.strip() for p in text.split("-")]
    try:
        return len(parts) == 2 and all(_HHMM.match(p) for p in parts) and \
            time.fromisoformat(parts[0]) != time.fromisoformat(parts[1])
    except ValueError:
        return False


@with_config(_TABLE)
@dataclass(frozen=True)
class ScheduleSettings:
    """One ``[[schedule]]`` table: a cron-driven scan (``scheduling.Schedule``)."""

    cron: Annotated[Str, _rule(croniter.is_valid, "is not a valid cron expression")]
    name: Str = ""                           # "" -> schedule-N (its place in the file)
    # seconds (or "30s", "15m", "2h"); each VM starts at a stable offset in [0, jitter)
    jitter: Annotated[float, BeforeValidator(_duration), Strict()] = 0.0
    window: Annotated[Str, _rule(_time_window, "must look like 22:00-06:00 (a daily UTC "
                                 "window, start and end differ)")] = ""
    full: Bool = True
    vms: Str = "*"                           # fnmatch pattern on the VM name


# -- vCenter and guest tables: the file's shape (URL, password sources) -> the settings -----

_THUMB_RE = re.compile(r"^([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}$")
_THUMB_RULE = "must be a SHA-256 fingerprint: 32 colon-separated hex bytes (AA:BB:...)"


def normalise_thumbprint(value: str) -> str:
    """Upper-case colon-separated SHA-256; ConfigError when malformed."""
    value = value.strip()
    if not _THUMB_RE.match(value):
        raise ConfigError(f"thumbprint {_THUMB_RULE}")
    return value.upper()


def _parse_server(raw: str) -> tuple[str, int, str, str]:
    """host[:port], [v6]:port or an SDK URL (https://user:pass@host:port/sdk).

    Returns host, port, user, password; ValueError (words without the key) when malformed.
    """
    raw = raw.strip()
    if "://" in raw:
        try:
            parts = urlsplit(raw)
            port = parts.port
        except ValueError as exc:   # "Invalid IPv6 URL", "Port out of range 0-65535", ...
            bad = "bad brackets" if "[" in raw or "]" in raw else "a bad port"
            raise ValueError(f"has {bad}: {raw!r} (use https://HOST[:PORT]/sdk)") from exc
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"must be https://HOST[:PORT]/sdk, not {raw!r}")
        host = parts.hostname
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
    else:
        if raw.startswith("["):          # [v6] or [v6]:port
            host, close, rest = raw[1:].partition("]")
            port_text = rest.removeprefix(":") if close and rest[:1] in ("", ":") else "x"
            if not close or not host:
                raise ValueError(f"has bad brackets: {raw!r}")
        elif raw.count(":") == 1:
            host, _, port_text = raw.partition(":")
        else:                            # a name, IPv4, or a bare IPv6 address
            host, port_text = raw, ""
        if "[" in host or "]" in host or "/" in host or not host:
            raise ValueError(f"has bad brackets or is not HOST[:PORT]: {raw!r}")
        port = int(port_text) if port_text.isdigit() else (None if not port_text else -1)
        user = password = ""
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"has a bad port: {raw!r} (use 1 to 65535)")
    return host, port or 443, user, password


def _server(raw: str) -> str:
    try:
        _host, _port, _user, password = _parse_server(raw)
    except ValueError as exc:
        raise PydanticCustomError("config", str(exc)) from exc
    if password:
        raise PydanticCustomError("config", "must not carry a password: use password_file "
                                  "or password_env (or VSPHERE_AV_PASSWORD)")
    return raw


def _thumbprint(raw: str) -> str:
    if raw and not _THUMB_RE.match(raw.strip()):
        raise PydanticCustomError("config", _THUMB_RULE)
    return raw


@with_config(_TABLE)
@dataclass(frozen=True)
class _PasswordSource:
    password_file: Str = ""
    password_env: Str = ""


@with_config(_TABLE)
@dataclass(frozen=True)
class _VcenterTable(_PasswordSource):
    server: Annotated[Str, AfterValidator(_server)] = ""   # host[:port] or https://host/sdk
    user: Str = ""
    ca_file: Str = ""
    thumbprint: Annotated[Str, AfterValidator(_thumbprint)] = ""
    insecure: Bool = False


@with_config(_TABLE)
@dataclass(frozen=True)
class _CredentialTable(_PasswordSource):
    user: Str = ""
    vm: Str = ""
    folder: Str = ""


@with_config(_TABLE)
@dataclass(frozen=True)
class _GuestTable(_PasswordSource):
    user: Str = ""
    credentials: tuple[_CredentialTable, ...] = ()


def _tables(value: Any) -> Any:
    """``[[schedule]]`` (a list) or one ``[schedule]`` table."""
    return [value] if isinstance(value, Mapping) else value


@with_config(_TABLE)
@dataclass(frozen=True)
class _File:
    """The whole file as declared: every section and key that may appear."""

    state_dir: Str = ""
    vcenter: _VcenterTable = field(default_factory=_VcenterTable)
    guest: _GuestTable = field(default_factory=_GuestTable)
    engine: EngineSettings = field(default_factory=EngineSettings)
    scan: ScanPolicy = field(default_factory=ScanPolicy)
    tagging: TaggingSettings = field(default_factory=TaggingSettings)
    siem: SiemSettings = field(default_factory=SiemSettings)
    access: AccessSettings = field(default_factory=AccessSettings)
    isolation: IsolationSettings = field(default_factory=IsolationSettings)
    appliances: ApplianceSettings = field(default_factory=ApplianceSettings)
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    schedule: Annotated[tuple[ScheduleSettings, ...], BeforeValidator(_tables)] = ()
    api: ApiSettings = field(default_factory=ApiSettings)


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
    appliances: ApplianceSettings = field(default_factory=ApplianceSettings)
    controller: ControllerSettings = field(default_factory=ControllerSettings)
    schedules: tuple[ScheduleSettings, ...] = ()   # [[schedule]], each named
    api: ApiSettings = field(default_factory=ApiSettings)

    def with_state_dir(self, path: Path) -> Settings:
        """A copy with another state directory."""
        return replace(self, state_dir=path)


# -- pydantic's errors as one plain line ------------------------------------------------------

_WORDS: Mapping[str, str] = {
    "int_type": "must be a whole number", "bool_type": "must be true or false",
    "string_type": "must be a string", "float_type": "must be a number",
    "tuple_type": "must be a list of strings", "list_type": "must be a list of tables",
    "dataclass_type": "must be a table", "dataclass_exact_type": "must be a table",
    "greater_than_equal": "must be at least {ge}", "less_than_equal": "must be at most {le}",
}
_UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument")
_TABLE_LISTS: Mapping[str, str] = {"schedule": "[[schedule]]",
                                   "credentials": "[[guest.credentials]]"}


def _key(loc: Iterable[int | str]) -> str:
    """('guest', 'credentials', 0, 'user') -> 'guest.credentials[0].user'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _declared(loc: tuple[int | str, ...]) -> list[str]:
    """The keys declared at ``loc`` (a table's path in the file), for "did you mean"."""
    kind: Any = _File
    for part in loc:
        if isinstance(part, str):
            kind = get_type_hints(kind)[part]
        while get_origin(kind) in (Annotated, tuple, list):
            kind = get_args(kind)[0]
    return [f.name for f in dataclasses.fields(kind)] if dataclasses.is_dataclass(kind) else []


def _unknown(errors: list[ErrorDetails]) -> str:
    """One line for the unknown keys of the first table that has any."""
    parent = errors[0]["loc"][:-1]
    names = [str(e["loc"][-1]) for e in errors if e["loc"][:-1] == parent]
    where = _key(parent)
    if "password" in names and parent[:1] in (("vcenter",), ("guest",)):
        return f"{where}: inline passwords are not allowed; use password_file or password_env"
    declared = _declared(parent)
    # At the top a table is a section, shown as [name]; anything else is a setting.
    tables = {str(e["loc"][-1]) for e in errors
              if not parent and isinstance(e["input"], Mapping | list)}
    hints = []
    for name in names:
        for close in difflib.get_close_matches(name, declared, n=1, cutoff=0.6):
            hints.append(f"[{close}]" if name in tables else close)
    shown = ", ".join(f"[{n}]" if n in tables else n for n in names)
    if not parent:
        label = "unknown section(s)" if tables else "unknown setting(s)"
        text = f"{label}: {shown}"
    else:
        text = f"{where}: unknown setting(s): {shown}"
    return text + (f" (did you mean {', '.join(hints)}?)" if hints else "")


def _plain(exc: ValidationError) -> str:
    """The first problem pydantic found, as 'config: KEY must be ...' (unknown keys first)."""
    errors = exc.errors()
    unknown = [e for e in errors if e["type"] in _UNKNOWN]
    if unknown:
        return f"config: {_unknown(unknown)}"
    error = errors[0]
    loc, kind, ctx = error["loc"], error["type"], error.get("ctx") or {}
    if kind == "string_type" and loc and isinstance(loc[-1], int):
        loc, kind = loc[:-1], "tuple_type"        # one entry of a list of strings
    key = _key(loc)
    if kind == "config_line":
        return f"config: {error['msg']}"
    if kind in ("tuple_type", "list_type") and loc and loc[-1] in _TABLE_LISTS:
        return f"config: {key} must be a list of tables ({_TABLE_LISTS[str(loc[-1])]})"
    if kind == "config":
        message = error["msg"]
        return f"config: {key}{message}" if message.startswith(":") else \
            f"config: {key} {message}"
    if kind == "missing":
        return f"config: {_key(loc[:-1])} needs {loc[-1]}"
    if kind == "greater_than":      # sizes: the only fields declared with gt=0
        return f"config: {key} must be a positive whole number"
    if kind == "dataclass_type" and len(loc) == 1:
        return f"config: {key} must be a table ([{key}])"
    if kind in _WORDS:
        return f"config: {key} {_WORDS[kind].format(**ctx)}"
    return f"config: {key}: {error['msg']}"


# -- loading ----------------------------------------------------------------------------------

_FILE = TypeAdapter(_File)


def default_state_dir() -> Path:
    """Per-user state directory: $XDG_STATE_HOME/vsphere-av or ~/.local/state/vsphere-av."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "vsphere-av"


def _read_secret(table: _PasswordSource, where: str, env: Mapping[str, str]) -> Secret:
    if table.password_env:
        if table.password_env not in env:
            raise ConfigError(f"{where}: environment variable {table.password_env} is not set")
        return Secret(env[table.password_env])
    if table.password_file:
        path = Path(table.password_file).expanduser()
        try:
            return Secret(path.read_text(encoding="utf-8").rstrip("\r\n"))
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read password_file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{where}: password_file {path} is not UTF-8 text") from exc
    return Secret("")


def read_file(path: Path) -> dict[str, Any]:
    """The TOML document of ``path`` (for :func:`load`); ConfigError when unreadable or bad."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8-sig")   # TOML is UTF-8; a BOM (Windows editors) is harmless
    except UnicodeDecodeError as exc:
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:64]
        hint = " (it looks like UTF-16: save it as UTF-8)" if utf16 else ""
        raise ConfigError(f"config file {path} is not UTF-8 text{hint}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def load(
    *,
    config_file: str | os.PathLike[str] | None = None,
    insecure: bool = False,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Read the TOML file (if any), apply environment overrides, validate everything."""
    data = read_file(Path(config_file).expanduser()) if config_file else {}
    return parse(data, insecure=insecure, env=os.environ if env is None else env)


def parse(data: Mapping[str, Any], *, insecure: bool = False,
          env: Mapping[str, str]) -> Settings:
    """Settings from a TOML document already read: :func:`load`, and tests with a mapping.

    ConfigError, one line naming the key, on anything the declarations refuse.
    """
    try:
        file = _FILE.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(_plain(exc)) from None   # pydantic's own text is not for people
    state_dir = Path(env.get("VSPHERE_AV_STATE_DIR") or file.state_dir or default_state_dir())

    vc = file.vcenter
    server_raw = env.get("VSPHERE_AV_SERVER") or vc.server
    try:
        host, port, url_user, url_password = (
            _parse_server(server_raw) if server_raw else ("", 443, "", ""))
    except ValueError as exc:
        where = "VSPHERE_AV_SERVER" if env.get("VSPHERE_AV_SERVER") else "vcenter.server"
        raise ConfigError(f"{where} {exc}") from None
    password = _read_secret(vc, "vcenter", env)
    if env.get("VSPHERE_AV_PASSWORD"):
        password = Secret(env["VSPHERE_AV_PASSWORD"])
    elif not password and url_password:
        password = Secret(url_password)   # from VSPHERE_AV_SERVER only: the file may not
    thumb = env.get("VSPHERE_AV_THUMBPRINT") or vc.thumbprint
    ca_file = env.get("VSPHERE_AV_CA_FILE") or vc.ca_file
    if ca_file and not Path(ca_file).expanduser().is_file():
        raise ConfigError(f"CA file not found: {ca_file}")
    vcenter = VcenterSettings(
        server=host,
        port=port,
        user=env.get("VSPHERE_AV_USER") or vc.user or url_user,
        password=password,
        ca_file=str(Path(ca_file).expanduser()) if ca_file else "",
        thumbprint=normalise_thumbprint(thumb) if thumb else "",
        insecure=insecure or env.get("VSPHERE_AV_INSECURE", "") in ("1", "true", "yes")
        or vc.insecure,
    )

    creds = []
    for i, entry in enumerate(file.guest.credentials):
        where = f"guest.credentials[{i}]"
        if not entry.user:
            raise ConfigError(f"config: {where} needs a user")
        if not entry.vm and not entry.folder:
            raise ConfigError(f"config: {where} needs vm (a name pattern) or folder")
        creds.append(GuestCredential(user=entry.user, password=_read_secret(entry, where, env),
                                     vm=entry.vm, folder=entry.folder))
    guest_password = _read_secret(file.guest, "guest", env)
    if env.get("VSPHERE_AV_GUEST_PASSWORD"):
        guest_password = Secret(env["VSPHERE_AV_GUEST_PASSWORD"])
    guest = GuestSettings(user=env.get("VSPHERE_AV_GUEST_USER") or file.guest.user,
                          password=guest_password, credentials=tuple(creds))

    appliances = file.appliances
    if appliances.source == "template" and not appliances.template:
        raise ConfigError("config: appliances.template must name a template VM when "
                          "source = template")
    schedules = tuple(replace(s, name=s.name or f"schedule-{i + 1}")
                      for i, s in enumerate(file.schedule))
    return Settings(
        state_dir=state_dir, vcenter=vcenter, guest=guest, engine=file.engine, scan=file.scan,
        tagging=file.tagging, siem=file.siem, access=file.access, isolation=file.isolation,
        appliances=appliances, controller=file.controller, schedules=schedules,
        api=file.api,
    )
