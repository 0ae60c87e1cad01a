"""Guest file operations on one VM: list (paged), walk, stream out, upload, delete, move, mkdir.

Called by ``scanning.py`` (through the collaborator it is given) and ``app.py`` (quarantine
restore); calls ``Connection.call`` for the SOAP side (GuestFileManager), ``ssl`` sockets for
downloads and ``requests`` for uploads. Faults become ``errors.GuestLoginError``,
``GuestUnavailable``, ``GuestFileNotFound``, ``GuestFileExists``, ``InvalidPowerState``,
``NotFound`` or ``TransientError``. The guest password travels only inside the SOAP request.

Transfers (``https://*:PORT/guestFile?...``) go to the ESXi host the VM runs on: ``*`` is
replaced by the host's management address. TLS for that hop, in this order:
  1. the host certificate's SHA-256, computed from the PEM vCenter reports in
     ``HostSystem.config.certificate``, is pinned (the way govmomi pins ESXi hosts);
  2. otherwise, with a CA file for vCenter, the host certificate must chain to the same CA
     and name the host (vCenter's VMCA signs ESXi certificates);
  3. otherwise, with a pinned vCenter thumbprint, that thumbprint is pinned for the host too
     (true when vCenter and the transfer endpoint are the same server, as in the simulator;
     on a real vCenter step 1 applies first);
  4. ``insecure`` skips verification, as for vCenter.
Bodies are streamed (1 MiB chunks) and each transfer uses a fresh connection with
``Connection: close``: transfer URLs are single-use and ESXi wants no keep-alive. Downloads
(the scan path, one per file) go through one :class:`_TransferClient` per host and trust:
one prepared SSL context, the pin checked on every connection, and the TLS session of the
previous transfer to that host offered again (resumption: no certificate exchange and no
RSA signature on the host for each small file). Uploads (rare) use ``requests``.

The two calls made for every file or directory, ListFilesInGuest and
InitiateFileTransferFromGuest, skip pyVmomi's generic (de)serialisation: the request is
pyVmomi's own serialisation with placeholders, made once per VM and login, sent on the SOAP
stub's pooled connections (verified and kept alive by pyVmomi, as for every vCenter call),
and the answer is read by a small expat parser. Faults and anything unexpected are handed
to pyVmomi's deserialiser, so callers see the same errors as through :meth:`_call`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import logging
import posixpath
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit
from xml.parsers import expat
from xml.sax.saxutils import escape as xml_escape

import requests
import urllib3
from pyVmomi import SoapAdapter, vim
from pyVmomi.Iso8601 import ParseISO8601
from requests.adapters import HTTPAdapter

from vsphere_av import errors
from vsphere_av.config import Secret
from vsphere_av.models import GuestFile, HostInfo, VmInfo
from vsphere_av.vsphere.connection import Connection, TlsTrust
from vsphere_av.vsphere.faults import translate

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
RECV = 64 * 1024
MAX_HEAD = 64 * 1024
PAGE = 200                   # entries per ListFilesInGuest call
TRANSFER_TIMEOUT = (15.0, 120.0)
MAX_DEPTH = 64
MAX_ENTRIES = 5_000_000


class SupportsRead(Protocol):
    """A readable byte stream of known length (quarantine blobs, local files)."""

    def read(self, size: int = -1) -> bytes: ...


def join(directory: str, name: str, *, windows: bool) -> str:
    """Join a guest directory and an entry name with the guest's separator."""
    sep = "\\" if windows else "/"
    if directory.endswith(("/", "\\")):
        return directory + name
    return directory + sep + name


def parent_of(path: str, *, windows: bool) -> str:
    """The directory part of a guest path ("" at the root)."""
    if windows:
        norm = path.replace("/", "\\").rstrip("\\")
        head = norm.rsplit("\\", 1)[0] if "\\" in norm else ""
        return head + "\\" if len(head) == 2 and head.endswith(":") else head
    head = posixpath.dirname(path.rstrip("/"))
    return head


def _mtime(attrs: Any) -> str:
    value = getattr(attrs, "modificationTime", None)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value) if value else ""


class _TrustAdapter(HTTPAdapter):
    """requests adapter with one prepared SSL context (and optionally a pinned fingerprint).

    Handing urllib3 a ready context matters: left to itself it builds a new context and
    loads the system CA store for every connection (about 25 ms), and every transfer is a
    new connection.
    """

    def __init__(self, *, context: ssl.SSLContext, fingerprint: str = "") -> None:
        self._context = context
        self._fingerprint = fingerprint.replace(":", "").lower()
        super().__init__(pool_connections=1, pool_maxsize=1, max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        pool_kwargs["ssl_context"] = self._context
        if self._fingerprint:
            pool_kwargs["assert_fingerprint"] = self._fingerprint
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


_CONTEXTS: dict[str, ssl.SSLContext] = {}
_CONTEXTS_LOCK = threading.Lock()


def _context(ca_file: str = "") -> ssl.SSLContext:
    """A shared client context: verifying against ``ca_file``, or none (pinning checks)."""
    with _CONTEXTS_LOCK:
        ctx = _CONTEXTS.get(ca_file)
        if ctx is None:
            if ca_file:
                ctx = ssl.create_default_context(cafile=ca_file)
            else:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            _CONTEXTS[ca_file] = ctx
        return ctx


def _http_session(host: HostInfo | None, trust: TlsTrust) -> tuple[requests.Session, bool | str]:
    """A session and a `verify` value implementing the module's transfer trust rules."""
    session = requests.Session()
    session.trust_env = False          # never route guest bytes through a proxy from the env
    session.headers["Connection"] = "close"
    if host is not None and host.certificate_sha256:
        session.mount("https://", _TrustAdapter(context=_context(),
                                                fingerprint=host.certificate_sha256))
        return session, False
    if trust.ca_file:
        session.mount("https://", _TrustAdapter(context=_context(trust.ca_file)))
        return session, trust.ca_file
    if trust.thumbprint:
        session.mount("https://", _TrustAdapter(context=_context(), fingerprint=trust.thumbprint))
        return session, False
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # asked for: --insecure
    session.mount("https://", _TrustAdapter(context=_context()))
    return session, False


def _transfer_trust(host: HostInfo | None, trust: TlsTrust) -> tuple[str, str]:
    """(CA file, pinned SHA-256 hex) for a transfer, in the module's trust order."""
    if host is not None and host.certificate_sha256:
        return "", host.certificate_sha256
    if trust.ca_file:
        return trust.ca_file, ""
    if trust.thumbprint:
        return "", trust.thumbprint
    return "", ""


class _TransferClient:
    """GETs of transfer URLs on one ESXi host with one trust (thread-safe).

    Every GET is a new connection with ``Connection: close``; the TLS session of the last
    one is offered for resumption (sessions never cross hosts or trusts: one client per
    both). The pin is checked on every connection, resumed or not.
    """

    def __init__(self, *, ca_file: str, fingerprint: str) -> None:
        self._context = _context(ca_file)     # CA file: chain and host name verified
        self._pin = fingerprint.replace(":", "").lower()
        self._session: ssl.SSLSession | None = None
        self._single_use = False
        self._lock = threading.Lock()

    def get(self, host: str, port: int, target: str, *, what: str,
            netloc: str = "") -> _Response:
        """Send ``GET target`` and return the response with its head read."""
        with self._lock:
            offered = self._session
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((host, port), timeout=TRANSFER_TIMEOUT[0])
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self._context.wrap_socket(sock, server_hostname=host, session=offered)
            sock = tls
            if self._pin:
                got = hashlib.sha256(tls.getpeercert(binary_form=True) or b"").hexdigest()
                if got != self._pin:
                    raise errors.TlsVerificationError(
                        f"{what}: certificate of {host}:{port} does not match the pinned "
                        f"thumbprint: expected {_colons(self._pin)}, got {_colons(got)}")
            tls.settimeout(TRANSFER_TIMEOUT[1])
            tls.sendall(f"GET {target} HTTP/1.1\r\nHost: {netloc or host}\r\n"
                        "Connection: close\r\nAccept-Encoding: identity\r\n"
                        "User-Agent: vsphere-av\r\n\r\n".encode("ascii"))
            response = _Response.receive(tls)
            self._keep_session(tls, offered)
            return response
        except errors.VsphereAvError:
            if sock is not None:
                sock.close()
            raise
        except UnicodeError as exc:
            if sock is not None:
                sock.close()
            raise errors.GuestError(f"{what}: transfer URL is not plain ASCII") from exc
        except (OSError, http.client.HTTPException) as exc:
            if sock is not None:
                sock.close()
            raise translate(exc, what=what) from exc


    def _keep_session(self, tls: ssl.SSLSocket, offered: ssl.SSLSession | None) -> None:
        # Reading a session out costs about as much as the resumed handshake saves, so a
        # session the host accepted is kept; a host whose tickets are single-use (one that
        # refused a session it issued) gets the new session of every connection.
        resumed = tls.session_reused
        if offered is not None and resumed and not self._single_use:
            return
        if offered is not None and not resumed:
            self._single_use = True
        session = tls.session
        if session is not None:
            with self._lock:
                self._session = session


class _Response:
    """One HTTP/1.1 response read straight off its socket (the request said Connection: close).

    Bodies with Content-Length, chunked bodies and bodies up to the end of the connection;
    ``read`` returns b"" at the end (a body cut short shows as fewer bytes than announced).
    """

    def __init__(self, sock: socket.socket, status: int, headers: dict[str, str],
                 rest: bytearray) -> None:
        self._sock = sock
        self.status = status
        self.headers = headers
        self._buf = rest
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._left: int | None = None
        if length is not None and not self._chunked:
            if not length.strip().isdigit():
                raise http.client.HTTPException(f"bad Content-Length {length!r}")
            self._left = int(length)
        self.expected_length = self._left
        self._chunk_left = 0
        self._done = False

    @classmethod
    def receive(cls, sock: socket.socket) -> _Response:
        """Read the status line and headers."""
        buf = bytearray()
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > MAX_HEAD:
                raise http.client.HTTPException("response head larger than 64 KiB")
            data = sock.recv(RECV)
            if not data:
                raise http.client.RemoteDisconnected("connection closed before the response")
            buf += data
        lines = bytes(buf[:end]).decode("iso-8859-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise http.client.BadStatusLine(lines[0][:100])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        del buf[:end + 4]
        return cls(sock, int(code), headers, buf)

    @property
    def reusable(self) -> bool:
        """True when the body had a known end and the server keeps the connection open."""
        return (self._chunked or self.expected_length is not None) and \
            self.headers.get("connection", "").lower() != "close"

    def _take(self, n: int) -> bytes:
        """Up to ``n`` bytes of the raw stream (b"" at its end)."""
        if not self._buf:
            data = self._sock.recv(max(n, RECV))
            if not data:
                return b""
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > MAX_HEAD:
                raise http.client.IncompleteRead(b"")
            data = self._sock.recv(RECV)
            if not data:
                raise http.client.IncompleteRead(bytes(self._buf))
            self._buf += data
        line = bytes(self._buf[:end])
        del self._buf[:end + 2]
        return line

    def read(self, amt: int | None = None) -> bytes:
        """Up to ``amt`` bytes of the body (all of it with None); b"" at the end."""
        want = CHUNK if amt is None or amt < 0 else amt
        if self._done or want == 0:
            return b""
        if self._chunked:
            return self._read_chunked(want)
        if self._left is not None:
            want = min(want, self._left)
            if want == 0:
                self._done = True
                return b""
        out = bytearray(want)
        view = memoryview(out)
        got = min(len(self._buf), want)
        view[:got] = self._buf[:got]
        del self._buf[:got]
        while got < want:
            n = self._sock.recv_into(view[got:], want - got)
            if n == 0:
                self._done = True
                break
            got += n
        if self._left is not None:
            self._left -= got
        return bytes(view[:got])

    def _read_chunked(self, want: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while size < want:
            if self._chunk_left == 0:
                line = self._line().split(b";", 1)[0].strip()
                try:
                    self._chunk_left = int(line, 16)
                except ValueError as exc:
                    raise http.client.IncompleteRead(line) from exc
                if self._chunk_left == 0:
                    while self._line():   # trailer fields, up to the empty line
                        pass
                    self._done = True
                    break
            piece = self._take(min(self._chunk_left, want - size))
            if not piece:
                raise http.client.IncompleteRead(b"".join(parts))
            parts.append(piece)
            size += len(piece)
            self._chunk_left -= len(piece)
            if self._chunk_left == 0:
                self._line()          # the CRLF after each chunk
        return b"".join(parts)

    def close(self) -> None:
        """Close the connection (the request asked for no keep-alive)."""
        self._done = True
        self._sock.close()


def _colons(hex_digest: str) -> str:
    return ":".join(hex_digest[i:i + 2] for i in range(0, len(hex_digest), 2)).upper()


_CLIENTS: dict[tuple[str, str, str], _TransferClient] = {}
_MAX_CLIENTS = 4096


def _transfer_client(netloc: str, host: HostInfo | None, trust: TlsTrust) -> _TransferClient:
    """The shared client for transfers to ``netloc`` under this trust."""
    ca_file, pin = _transfer_trust(host, trust)
    key = (netloc, ca_file, pin)
    client = _CLIENTS.get(key)
    if client is not None:
        return client
    fresh = _TransferClient(ca_file=ca_file, fingerprint=pin)
    with _CONTEXTS_LOCK:
        if len(_CLIENTS) >= _MAX_CLIENTS:
            _CLIENTS.clear()
        return _CLIENTS.setdefault(key, fresh)


def transfer_url(url: str, host_address: str) -> str:
    """Replace the `*` host of a guest transfer URL with the ESXi host's address."""
    parts = urlsplit(url)
    if parts.hostname not in ("*", None) and "*" not in parts.netloc:
        return url
    if not host_address:
        raise errors.GuestError(
            "transfer URL needs the ESXi host address, which vCenter did not report")
    host = f"[{host_address}]" if ":" in host_address else host_address
    netloc = parts.netloc.replace("*", host, 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class _Body(Protocol):
    """What a download reads from: an HTTP response body."""

    def read(self, amt: int | None = None) -> bytes: ...
    def close(self) -> None: ...


@dataclass
class Download:
    """An open guest file transfer: iterate :meth:`chunks` once, then it is closed."""

    path: str
    size: int
    _response: _Body
    local = True        # the bytes come through this process (scanning may read ahead)

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes in chunks; TransientError when the stream ends early."""
        got = 0
        read = self._response.read
        try:
            while chunk := read(CHUNK):
                got += len(chunk)
                yield chunk
        except (http.client.HTTPException, OSError) as exc:
            raise errors.TransientError(f"download of {self.path} broke off: {exc}") from exc
        finally:
            self._response.close()
        if got != self.size:
            raise errors.TransientError(f"download of {self.path}: got {got} of {self.size} bytes")

    def close(self) -> None:
        """Release the connection."""
        self._response.close()

    def __enter__(self) -> Download:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GuestFiles:
    """Guest file operations on one VM with one guest account (thread-safe)."""

    local_downloads = True      # downloads are read here: scanning may fetch them ahead

    def __init__(self, *, connection: Connection, vm: VmInfo, user: str, password: Secret) -> None:
        self._conn = connection
        self.vm = vm
        self._user = user
        self._password = password
        self.windows = vm.is_windows
        self._prepared: tuple[Any, Any, Any] | None = None     # (stub, VM ref, auth)
        self._templates: dict[tuple[str, tuple[str, ...]], Any] = {}

    def __repr__(self) -> str:
        return f"GuestFiles(vm={self.vm.name!r}, user={self._user!r})"

    # --- SOAP side -------------------------------------------------------------------------

    def _auth(self) -> Any:
        return vim.vm.guest.NamePasswordAuthentication(
            username=self._user, password=self._password.reveal(), interactiveSession=False)

    def _prepare(self) -> tuple[Any, Any, Any]:
        # The VM reference and the credentials object are built once per SOAP stub (a new
        # login may bring a new stub), not once per call.
        stub = self._conn.stub
        prepared = self._prepared
        if prepared is None or prepared[0] is not stub:
            prepared = self._prepared = (stub, self._conn.ref("VirtualMachine", self.vm.moref),
                                         self._auth())
            self._templates = {}
        return prepared

    def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        fm = self._conn.singleton("guest file manager",
                                  lambda c: c.guestOperationsManager.fileManager)

        def run(content: Any) -> Any:
            _, vm_ref, auth = self._prepare()
            return getattr(fm, method)(vm=vm_ref, auth=auth, **kwargs)
        return self._conn.call(f"{what} on {self.vm.name}", run)

    def _lean_call(self, what: str, method: str, values: dict[str, str | int],
                   parse: Callable[[bytes], Any], convert: Callable[[Any], Any]) -> Any:
        """A hot guest call with the request prepared once and a lean response parser.

        The request is pyVmomi's own serialization of this method with placeholders, made
        once per VM and login; only the values change. A fault (HTTP 500) and anything the
        lean parser does not understand are deserialized by pyVmomi, so errors are exactly
        those of :meth:`_call`. Falls back to :meth:`_call` when the request cannot be
        prepared.
        """
        fm = self._conn.singleton("guest file manager",
                                  lambda c: c.guestOperationsManager.fileManager)

        def run(content: Any) -> Any:
            stub, vm_ref, auth = self._prepare()
            key = (method, tuple(values))
            template = self._templates.get(key)
            if template is None:
                template = self._templates[key] = _soap_template(stub, fm, method, vm_ref, auth,
                                                                 tuple(values))
            if template is _NO_TEMPLATE:
                return convert(self._invoke(fm, method, vm_ref, auth, values))
            info, parts, order = template
            body = bytearray(parts[0])
            for name, part in zip(order, parts[1:], strict=True):
                value = values[name]
                body += (str(value) if isinstance(value, int) else xml_escape(value)).encode()
                body += part
            status, data = _soap_post(stub, bytes(body))
            if status == 200:
                try:
                    return parse(data)
                except (ValueError, KeyError, expat.ExpatError):
                    log.debug("%s: lean parse failed; pyVmomi deserializes", what)
            result = SoapAdapter.SoapResponseDeserializer(stub).Deserialize(io.BytesIO(data),
                                                                            info.result)
            if isinstance(result, BaseException):
                raise result
            if status != 200:
                raise http.client.HTTPException(f"SOAP status {status}")
            return convert(result)
        return self._conn.call(f"{what} on {self.vm.name}", run)

    def _invoke(self, fm: Any, method: str, vm_ref: Any, auth: Any,
                values: dict[str, str | int]) -> Any:
        name = {"ListFiles": "ListFilesInGuest"}.get(method, method)
        return getattr(fm, name)(vm=vm_ref, auth=auth, **values)

    def list_dir(self, path: str, *, pattern: str | None = None) -> Iterator[GuestFile]:
        """Entries of one guest directory (all pages); "." and ".." left out."""
        index = 0
        while True:
            values: dict[str, str | int] = {"filePath": path, "index": index, "maxResults": PAGE}
            if pattern:
                values["matchPattern"] = pattern
            entries, remaining = self._lean_call(f"list {path}", "ListFiles", values,
                                                 _parse_list, _list_from_vim)
            for raw, kind, size, mtime, perms in entries:
                name = raw.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
                if name in (".", "..", ""):
                    continue
                yield GuestFile(path=join(path, name, windows=self.windows), name=name,
                                type=kind, size=size, mtime=mtime, permissions=perms)
            index += len(entries)
            if not entries or not remaining:
                return

    def stat(self, path: str) -> GuestFile | None:
        """The entry for one path (listed from its parent), or None when it does not exist."""
        parent = parent_of(path, windows=self.windows) or ("C:\\" if self.windows else "/")
        name = path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        flags = "(?i)" if self.windows else ""
        try:
            for entry in self.list_dir(parent, pattern=f"{flags}^{re.escape(name)}$"):
                if entry.name == name or (self.windows and entry.name.lower() == name.lower()):
                    return entry
        except errors.GuestFileNotFound:
            return None
        return None

    def walk(self, roots: Sequence[str], *,
             prune: Callable[[str], bool] = lambda p: False,
             on_error: Callable[[str, errors.GuestError], None] = lambda p, e: None,
             max_depth: int = MAX_DEPTH, max_entries: int = MAX_ENTRIES) -> Iterator[GuestFile]:
        """Every regular file under ``roots``, depth first, not following symlinks.

        ``prune(dir_path)`` True skips a directory; errors on one directory (vanished,
        permission) go to ``on_error`` and the walk goes on; login, tools and power errors end it.
        """
        seen = 0
        stack: list[tuple[str, int]] = [(r, 0) for r in reversed(roots)]
        while stack:
            directory, depth = stack.pop()
            try:
                entries = list(self.list_dir(directory))
            except (errors.GuestLoginError, errors.GuestUnavailable):
                raise
            except errors.GuestError as exc:
                on_error(directory, exc)
                continue
            subdirs: list[str] = []
            for entry in entries:
                seen += 1
                if seen > max_entries:
                    on_error(directory, errors.GuestError(
                        f"more than {max_entries} entries: walk stopped"))
                    return
                if entry.type == "directory":
                    if depth + 1 > max_depth:
                        on_error(entry.path, errors.GuestError(
                            f"deeper than {max_depth} levels: not walked"))
                    elif not prune(entry.path):
                        subdirs.append(entry.path)
                elif entry.type == "file":
                    yield entry
            stack.extend((d, depth + 1) for d in reversed(subdirs))

    def open_download(self, path: str) -> Download:
        """Start streaming one guest file out (InitiateFileTransferFromGuest + HTTPS GET)."""
        what = f"download {path} from {self.vm.name}"
        raw_url, size = self._lean_call(f"download {path}", "InitiateFileTransferFromGuest",
                                        {"guestFilePath": path}, _parse_transfer,
                                        _transfer_from_vim)
        url = urlsplit(transfer_url(raw_url, self.vm.host.address if self.vm.host else ""))
        if url.scheme != "https" or not url.hostname:
            raise errors.GuestError(f"{what}: unexpected transfer URL scheme {url.scheme!r}")
        client = _transfer_client(url.netloc, self.vm.host, self._conn.trust)
        target = f"{url.path or '/'}?{url.query}" if url.query else (url.path or "/")
        response = client.get(url.hostname, url.port or 443, target, what=what,
                              netloc=url.netloc)
        if response.status == 404:
            response.close()
            raise errors.GuestFileNotFound(f"{what}: gone (HTTP 404)")
        if response.status != 200:
            response.close()
            raise errors.TransientError(f"{what}: HTTP {response.status}")
        return Download(path=path, size=size, _response=response)

    def upload(self, path: str, body: SupportsRead, *, size: int, overwrite: bool = False,
               permissions: int | None = None) -> None:
        """Write ``size`` bytes from ``body`` to a guest path (transfer to guest + PUT)."""
        if self.windows:
            attrs: Any = vim.vm.guest.FileManager.WindowsFileAttributes()
        else:
            attrs = vim.vm.guest.FileManager.PosixFileAttributes()
            if permissions is not None:
                attrs.permissions = permissions
        url = self._call(f"upload {path}", "InitiateFileTransferToGuest", guestFilePath=path,
                         fileAttributes=attrs, fileSize=size, overwrite=overwrite)
        url = transfer_url(str(url), self.vm.host.address if self.vm.host else "")
        session, verify = _http_session(self.vm.host, self._conn.trust)
        try:
            response = session.put(url, data=_Sized(body, size), verify=verify,
                                   timeout=TRANSFER_TIMEOUT,
                                   headers={"Content-Type": "application/octet-stream"})
        except requests.exceptions.RequestException as exc:
            raise translate(exc, what=f"upload {path} to {self.vm.name}") from exc
        finally:
            session.close()
        if response.status_code not in (200, 201, 204):
            raise errors.GuestError(f"upload {path} to {self.vm.name}: HTTP {response.status_code}")

    def delete_file(self, path: str) -> None:
        """Delete one guest file."""
        self._call(f"delete {path}", "DeleteFileInGuest", filePath=path)

    def move_file(self, src: str, dst: str, *, overwrite: bool = False) -> None:
        """Rename / move one guest file."""
        self._call(f"move {src}", "MoveFileInGuest", srcFilePath=src, dstFilePath=dst,
                   overwrite=overwrite)

    def make_dir(self, path: str, *, parents: bool = True) -> None:
        """Create a guest directory (and its parents); an existing one is fine."""
        with contextlib.suppress(errors.GuestFileExists):
            self._call(f"mkdir {path}", "MakeDirectoryInGuest", directoryPath=path,
                       createParentDirectories=parents)


# --- lean SOAP for the hot calls (listing, starting a transfer) ------------------------------

_NO_TEMPLATE: Any = object()
_MARKER = "vsphere-av-placeholder-"
_INT_MARKER = 987_650_000
_Entry = tuple[str, str, int, str, "int | None"]      # path, type, size, mtime, permissions


def _soap_template(stub: Any, fm: Any, method: str, vm_ref: Any, auth: Any,
                   names: tuple[str, ...]) -> Any:
    """(method info, request parts, placeholder order), or _NO_TEMPLATE when not possible."""
    try:
        info = fm._GetMethodInfo(method)
        argv: list[Any] = []
        markers: dict[str, str] = {}
        for i, param in enumerate(info.params):
            if param.name == "vm":
                argv.append(vm_ref)
            elif param.name == "auth":
                argv.append(auth)
            elif param.name in names:
                is_int = isinstance(param.type, type) and issubclass(param.type, int)
                marker = str(_INT_MARKER + i) if is_int else f"{_MARKER}{param.name}"
                markers[marker] = param.name
                argv.append(int(marker) if is_int else marker)
            else:
                argv.append(None)
        if set(markers.values()) != set(names):
            return _NO_TEMPLATE
        request = stub.SerializeRequest(fm, info, argv)
        text = request.decode("utf-8") if isinstance(request, bytes) else str(request)
        pieces = re.split("(" + "|".join(re.escape(f">{m}<") for m in markers) + ")", text)
        if len(pieces) != 2 * len(markers) + 1:
            return _NO_TEMPLATE
        parts = [pieces[0].encode()]
        order = []
        for k in range(1, len(pieces), 2):
            order.append(markers[pieces[k][1:-1]])
            parts[-1] += b">"
            parts.append(b"<" + pieces[k + 1].encode())
        return info, parts, order
    except (AttributeError, TypeError, ValueError) as exc:
        log.debug("no prepared request for %s (%s)", method, type(exc).__name__)
        return _NO_TEMPLATE


def _soap_post(stub: Any, body: bytes) -> tuple[int, bytes]:
    """POST a SOAP request over one of the stub's own pooled, verified connections.

    The request is written and the response read directly on the connection's socket
    (keep-alive to vCenter; http.client would parse every response head through the
    email package). A pooled connection that vCenter closed meanwhile is replaced once.
    """
    for attempt in (1, 2):
        conn = stub.GetConnection()
        if conn.sock is None:            # closed since it was pooled: a fresh, verified one
            conn.close()
            stub.DropConnections()
            conn = stub.GetConnection()
        may_retry = attempt == 1
        host = f"[{conn.host}]" if ":" in conn.host else conn.host
        if conn.port != 443:
            host = f"{host}:{conn.port}"
        head = (f"POST {stub.path} HTTP/1.1\r\nHost: {host}\r\nCookie: {stub.cookie}\r\n"
                f"SOAPAction: {stub.versionId}\r\nContent-Type: text/xml; charset=UTF-8\r\n"
                f"Content-Length: {len(body)}\r\nUser-Agent: vsphere-av\r\n\r\n")
        try:
            conn.sock.sendall(head.encode("utf-8") + body)
            response = _Response.receive(conn.sock)
            parts = []
            while chunk := response.read(CHUNK):
                parts.append(chunk)
            data = b"".join(parts)
            if response.expected_length not in (None, len(data)):
                raise http.client.IncompleteRead(data, response.expected_length)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            conn.close()
            if may_retry:
                continue
            stub.DropConnections()
            raise
        except (OSError, http.client.HTTPException):
            conn.close()
            stub.DropConnections()
            raise
        cookie = response.headers.get("set-cookie")
        if cookie:
            stub.cookie = cookie
        if response.status in (200, 500) and response.reusable:
            stub.ReturnConnection(conn)
        else:
            conn.close()
        return response.status, data
    raise http.client.RemoteDisconnected("vCenter closed the connection twice")


def _local(name: str) -> str:
    return name.rpartition(":")[2]


def _walk_xml(data: bytes, on_end: Callable[[str, str, list[str]], None]) -> None:
    """Call ``on_end(name, text, stack)`` for every element (names without prefixes)."""
    stack: list[str] = []
    text: list[str] = []

    def start(name: str, attrs: Any) -> None:
        stack.append(_local(name))
        text.clear()

    def end(name: str) -> None:
        local = stack.pop()
        on_end(local, "".join(text), stack)
        text.clear()

    parser = expat.ParserCreate()
    parser.buffer_text = True
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text.append
    parser.Parse(data, True)


def _iso(value: str) -> str:
    parsed = ParseISO8601(value) if value else None
    if value and parsed is None:
        raise ValueError(f"not an ISO 8601 time: {value!r}")
    return parsed.isoformat() if parsed is not None else ""


def _parse_list(data: bytes) -> tuple[list[_Entry], int]:
    """ListFilesInGuest's (entries, remaining) from the raw SOAP response."""
    entries: list[_Entry] = []
    current: dict[str, str] = {}
    remaining = [0]
    seen = [False]

    def on_end(name: str, text: str, stack: list[str]) -> None:
        parent = stack[-1] if stack else ""
        if name == "files" and parent == "returnval":
            perms = current.get("permissions", "")
            entries.append((current["path"], current.get("type", ""),
                            int(current.get("size") or 0),
                            _iso(current.get("modificationTime", "")),
                            int(perms) if perms != "" else None))
            current.clear()
        elif parent == "files" or (parent == "attributes" and stack[-2:-1] == ["files"]):
            current[name] = text
        elif name == "remaining" and parent == "returnval":
            remaining[0] = int(text or 0)
        elif name == "returnval":
            seen[0] = True

    _walk_xml(data, on_end)
    if not seen[0]:
        raise ValueError("no returnval")
    return entries, remaining[0]


def _list_from_vim(result: Any) -> tuple[list[_Entry], int]:
    entries: list[_Entry] = []
    for info in result.files or []:
        perms = getattr(info.attributes, "permissions", None)
        entries.append((str(info.path), str(info.type), int(info.size or 0),
                        _mtime(info.attributes), int(perms) if perms is not None else None))
    return entries, int(result.remaining or 0)


def _parse_transfer(data: bytes) -> tuple[str, int]:
    """InitiateFileTransferFromGuest's (url, size) from the raw SOAP response."""
    found: dict[str, str] = {}

    def on_end(name: str, text: str, stack: list[str]) -> None:
        if name in ("url", "size") and stack and stack[-1] == "returnval":
            found[name] = text

    _walk_xml(data, on_end)
    return found["url"], int(found["size"])


def _transfer_from_vim(info: Any) -> tuple[str, int]:
    return str(info.url), int(info.size)


class _Sized:
    """File-like with a length, so requests streams it with Content-Length (not chunked)."""

    def __init__(self, body: SupportsRead, size: int) -> None:
        self._body = body
        self._size = size

    def __len__(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        return self._body.read(CHUNK if n is None or n < 0 else n)
