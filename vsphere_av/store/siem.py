"""Forwarding the audit log to a SIEM over syslog: RFC 5424 messages carrying CEF (or JSON).

Called by ``cli`` (``vsphere-av audit forward``) and by ``app``'s ``serve`` loop (every
``siem.interval`` seconds while ``siem.target`` is set). Calls ``store.audit`` (entries after
the cursor, checkpoints), ``socket`` / ``ssl``, and the cursor file
``<state_dir>/siem-cursor.json``.

Transport (``siem.target``): ``tls://`` (RFC 5425; verified against ``siem.ca_file`` or the
system trust store, host name included; ``siem.insecure`` only when set on purpose),
``tcp://`` (RFC 6587) or ``udp://`` (RFC 5426, best effort: one datagram per entry). On TCP
and TLS each message is framed by octet counting (``LEN SP MSG``, RFC 6587 3.4.1) or, for
receivers that want it, by a newline (``siem.framing = "newline"``).

Message: ``<PRI>1 TIME HOST vsphere-av - ACTION - BODY`` with facility 13 (log audit), a
severity derived from the entry's CEF severity, the entry's own time, and BODY the entry as
``audit export`` writes it (a CEF:0 line by default, or JSON with ``siem.format = "jsonl"``).

Delivery, in order: the cursor (the last entry's seq and hash) moves forward only after the
socket has taken a batch, and is written atomically. A crash of ours or a refused connection
sends again from the cursor; a SIEM drops repeats by the entry's sequence number (``cs1`` /
``auditSeq`` in CEF, ``seq`` in JSON). Syslog has no acknowledgement, so what a receiver's
kernel took just before the receiver died can still be lost in transit; sequence numbers
are contiguous, so the SIEM sees such a gap (and ``audit export`` fills it). A kept
connection is checked before reuse (a receiver never sends, so a readable socket means it
closed). If the log no longer holds the cursor's entry with that hash, it was replaced or
rewritten: forwarding stops with an error instead of skipping or repeating silently
(``audit verify`` says more).

Anchoring: a round that has anything new besides checkpoints first appends a checkpoint
(``audit.checkpoint``: the seq and hash of the head it follows) and sends up to and including
it, so what the SIEM holds always ends with the chain's head as it was. Entries appended
while the round runs wait for the next round (and its checkpoint). A round with nothing new
but checkpoints (one whose sending failed) sends them without adding another, so
checkpoints never feed further rounds. Removing forwarded entries, or rewriting the log, then
fails ``audit verify --head SEQ:HASH`` with a checkpoint taken from the SIEM.
"""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsphere_av import __version__, errors
from vsphere_av.config import SiemSettings, parse_syslog_target
from vsphere_av.store.audit import (
    SIEM_CURSOR_FILE,
    AuditEntry,
    AuditLog,
    cef_severity,
    current_actor,
    to_cef,
    to_jsonl,
)

CURSOR_FILE = SIEM_CURSOR_FILE
BATCH = 500
TIMEOUT = 30.0
FACILITY = 13                  # log audit
MAX_UDP = 8192                 # bytes of one datagram; longer messages are cut (RFC 5426)


@dataclass(frozen=True)
class Cursor:
    """The last entry handed to the SIEM."""

    seq: int = 0
    hash: str = ""


def syslog_severity(cef: int) -> int:
    """RFC 5424 severity for a CEF severity (0-10): 2 critical ... 6 informational."""
    if cef >= 8:
        return 2
    if cef >= 6:
        return 4
    if cef >= 4:
        return 5
    return 6


def message(entry: AuditEntry, *, fmt: str, hostname: str) -> bytes:
    """One entry as an RFC 5424 syslog message (UTF-8, no framing)."""
    body = to_cef(entry, version=__version__) if fmt == "cef" else to_jsonl(entry)
    pri = FACILITY * 8 + syslog_severity(cef_severity(entry.action))
    msgid = "".join(c for c in entry.action if 33 <= ord(c) <= 126)[:32] or "-"
    return f"<{pri}>1 {entry.time} {hostname} vsphere-av - {msgid} - {body}".encode()


def frame(msg: bytes, *, framing: str) -> bytes:
    """A message as it goes on a TCP/TLS stream."""
    if framing == "newline":
        return msg.replace(b"\n", b" ") + b"\n"
    return str(len(msg)).encode() + b" " + msg


def unframe(data: bytes) -> list[bytes]:
    """The complete octet-counted messages at the start of a stream (the inverse of frame)."""
    out: list[bytes] = []
    while b" " in data:
        length, _, rest = data.partition(b" ")
        if not length.isdigit() or len(rest) < int(length):
            break
        out.append(rest[:int(length)])
        data = rest[int(length):]
    return out


class Forwarder:
    """Sends new audit entries to one SIEM target; one instance per thread."""

    def __init__(self, *, settings: SiemSettings, state_dir: Path | str,
                 hostname: str | None = None, actor: str | None = None) -> None:
        if not settings.target:
            raise errors.ConfigError("siem.target is not set: nothing to forward to")
        self.settings = settings
        self.scheme, self.host, self.port = parse_syslog_target(settings.target)
        self.state_dir = Path(state_dir)
        self.hostname = (hostname or socket.gethostname() or "-").split()[0][:255]
        self.actor = actor or current_actor(state_dir=self.state_dir)
        self._sock: Any = None

    def __repr__(self) -> str:
        return f"Forwarder({self.settings.target!r}, format={self.settings.format!r})"

    # -- cursor --------------------------------------------------------------------------
    @property
    def cursor_path(self) -> Path:
        """Where the cursor is kept."""
        return self.state_dir / CURSOR_FILE

    def cursor(self) -> Cursor:
        """The last entry sent (seq 0: nothing yet)."""
        try:
            data = json.loads(self.cursor_path.read_text(encoding="utf-8"))
            return Cursor(seq=int(data["seq"]), hash=str(data["hash"]))
        except FileNotFoundError:
            return Cursor()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise errors.StoreError(f"SIEM cursor {self.cursor_path} is unreadable: {exc}") \
                from exc

    def _save_cursor(self, cursor: Cursor) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".siem-cursor.", dir=self.state_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"seq": cursor.seq, "hash": cursor.hash,
                           "target": self.settings.target}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.cursor_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- sending -------------------------------------------------------------------------
    def forward(self) -> int:
        """Send every entry after the cursor, ending with a checkpoint; the number sent.
        Errors leave the cursor."""
        sent = 0
        with AuditLog.open(self.state_dir) as log:
            cursor = self.cursor()
            if cursor.seq:
                last = next(log.entries(after=cursor.seq - 1, limit=1), None)
                if last is None or last.seq != cursor.seq or last.hash != cursor.hash:
                    raise errors.AuditIntegrityError(
                        f"the audit log no longer holds entry {cursor.seq} as forwarded to "
                        f"{self.settings.target}: it was replaced or rewritten (run audit "
                        "verify; remove siem-cursor.json to send the whole log again)")
            # The checkpoint is appended before sending: the round ends with it even when
            # other entries are appended meanwhile (they wait for the next round).
            until = (log.checkpoint(actor=self.actor).seq if log.news_after(cursor.seq)
                     else log.head()[0])
            while True:
                batch = list(log.entries(after=cursor.seq, limit=BATCH, until=until))
                if not batch:
                    return sent
                self._send([message(e, fmt=self.settings.format, hostname=self.hostname)
                            for e in batch])
                cursor = Cursor(seq=batch[-1].seq, hash=batch[-1].hash)
                self._save_cursor(cursor)
                sent += len(batch)

    def _send(self, messages: list[bytes]) -> None:
        what = f"SIEM {self.settings.target}"
        try:
            sock = self._connect()
            if self.scheme == "udp":
                for msg in messages:
                    sock.send(msg[:MAX_UDP])
            else:
                sock.sendall(b"".join(frame(m, framing=self.settings.framing)
                                      for m in messages))
        except ssl.SSLCertVerificationError as exc:
            self.close()
            raise errors.TlsVerificationError(
                f"{what}: certificate did not verify: {exc.verify_message}") from exc
        except OSError as exc:
            self.close()
            raise errors.TransientError(f"{what}: {exc.strerror or exc}") from exc

    def _connect(self) -> Any:
        if self._sock is not None and self.scheme != "udp" and _peer_closed(self._sock):
            self.close()             # a syslog receiver never sends: readable means gone
        if self._sock is not None:
            return self._sock
        if self.scheme == "udp":
            sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                                 socket.SOCK_DGRAM)
            sock.connect((self.host, self.port))
            self._sock = sock
            return sock
        raw = socket.create_connection((self.host, self.port), timeout=TIMEOUT)
        if self.scheme == "tls":
            try:
                raw = self._tls_context().wrap_socket(raw, server_hostname=self.host)
            except BaseException:
                raw.close()
                raise
        self._sock = raw
        return raw

    def _tls_context(self) -> ssl.SSLContext:
        if self.settings.insecure:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        return ssl.create_default_context(cafile=self.settings.ca_file or None)

    def close(self) -> None:
        """Close the connection (the next forward opens a new one)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _peer_closed(sock: Any) -> bool:
    """True when the receiver closed (or reset) the connection we kept."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
