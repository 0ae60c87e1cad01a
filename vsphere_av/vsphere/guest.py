"""Guest file operations on one VM: list (paged), walk, stream out, upload, delete, move, mkdir.

Called by ``scan.job`` (through the collaborator it is given) and ``app`` (quarantine
restore); calls ``Connection.call`` for the SOAP side (GuestFileManager) and ``requests`` for
the transfer URLs. Faults become ``errors.GuestLoginError``, ``GuestUnavailable``,
``GuestFileNotFound``, ``GuestFileExists``, ``InvalidPowerState``, ``NotFound`` or
``TransientError``. The guest password travels only inside the SOAP request.

One file's trouble and an outage are told apart here: vCenter or the host's transfer
endpoint not answering (refused, reset, timed out) or the session gone is
``errors.ConnectionLost``, raised by every call alike, including ``walk`` (never passed to its
``on_error``) and ``open_download``; a download that breaks off mid-body or an HTTP error
status is a ``TransientError`` of that file (the caller's retry finds out whether the host
is gone).

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
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
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

import requests
import urllib3
from pyVmomi import vim
from requests.adapters import HTTPAdapter

from vsphere_av import errors
from vsphere_av.config import Secret
from vsphere_av.models import GuestFile, HostInfo, VmInfo
from vsphere_av.vsphere.connection import Connection, TlsTrust
from vsphere_av.vsphere.faults import translate

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
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

    def __init__(self, *, context: ssl.SSLContext, fingerprint: str = "",
                 pool_maxsize: int = 1) -> None:
        self._context = context
        self._fingerprint = fingerprint.replace(":", "").lower()
        # A pool of more than one connection blocks when full, so it stays a bound.
        super().__init__(pool_connections=1, pool_maxsize=pool_maxsize, max_retries=0,
                         pool_block=pool_maxsize > 1)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        pool_kwargs["ssl_context"] = self._context
        if self._fingerprint:
            pool_kwargs["assert_fingerprint"] = self._fingerprint
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


_CONTEXTS: dict[str, ssl.SSLContext] = {}
_CONTEXTS_LOCK = threading.Lock()


def _context(ca_file: str = "") -> ssl.SSLContext:
    """A shared client context for our own transfer clients, which never change it:
    verifying against ``ca_file``, or none (pinning checks)."""
    with _CONTEXTS_LOCK:
        ctx = _CONTEXTS.get(ca_file)
        if ctx is None:
            ctx = _CONTEXTS[ca_file] = _new_context(ca_file)
        return ctx


def _new_context(ca_file: str = "") -> ssl.SSLContext:
    """A client context of its own: verifying against ``ca_file``, or none (pinning checks).

    urllib3 changes the context it is given on every connection (verify mode, ALPN, CA
    locations), so each requests adapter gets its own, never one another thread uses.
    """
    if ca_file:
        return ssl.create_default_context(cafile=ca_file)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _http_session(host: HostInfo | None, trust: TlsTrust, *, keep_alive: bool = False,
                  pool_maxsize: int = 1) -> tuple[requests.Session, bool | str]:
    """A session and a `verify` value implementing the module's transfer trust rules.

    Transfer URLs get ``Connection: close``; ``keep_alive`` (datastore range reads, many
    requests to one host) keeps up to ``pool_maxsize`` connections open instead.
    """
    session = requests.Session()
    session.trust_env = False          # never route guest bytes through a proxy from the env
    if not keep_alive:
        session.headers["Connection"] = "close"
    ca_file, pin = _transfer_trust(host, trust)
    if not (ca_file or pin):
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # asked: --insecure
    session.mount("https://", _TrustAdapter(context=_new_context(ca_file), fingerprint=pin,
                                            pool_maxsize=pool_maxsize))
    return session, ca_file or False


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

    def get(self, host: str, port: int, target: str, *, what: str) -> http.client.HTTPResponse:
        """Send ``GET target`` and return the response with its headers read."""
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
            conn = http.client.HTTPConnection(host, port)
            conn.sock = tls
            conn.request("GET", target, headers={"Connection": "close",
                                                 "Accept-Encoding": "identity"})
            response = conn.getresponse()
            self._keep_session(tls, offered)
            conn.sock = None        # the response owns the socket now
            return response
        except errors.VsphereAvError:
            if sock is not None:
                sock.close()
            raise
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

    def __repr__(self) -> str:
        return f"GuestFiles(vm={self.vm.name!r}, user={self._user!r})"

    # --- SOAP side -------------------------------------------------------------------------

    def _auth(self) -> Any:
        return vim.vm.guest.NamePasswordAuthentication(
            username=self._user, password=self._password.reveal(), interactiveSession=False)

    def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        fm = self._conn.singleton("guest file manager",
                                  lambda c: c.guestOperationsManager.fileManager)

        def run(content: Any) -> Any:
            # The VM reference and the credentials object are built once per SOAP stub
            # (a new login may bring a new stub), not once per call.
            stub = self._conn.stub
            if self._prepared is None or self._prepared[0] is not stub:
                self._prepared = (stub, self._conn.ref("VirtualMachine", self.vm.moref),
                                  self._auth())
            _, vm_ref, auth = self._prepared
            return getattr(fm, method)(vm=vm_ref, auth=auth, **kwargs)
        return self._conn.call(f"{what} on {self.vm.name}", run)

    def list_dir(self, path: str, *, pattern: str | None = None) -> Iterator[GuestFile]:
        """Entries of one guest directory (all pages); "." and ".." left out."""
        index = 0
        extra: dict[str, Any] = {"matchPattern": pattern} if pattern else {}
        while True:
            result = self._call(f"list {path}", "ListFilesInGuest", filePath=path, index=index,
                                maxResults=PAGE, **extra)
            files = list(result.files or [])
            for info in files:
                name = str(info.path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
                if name in (".", "..", ""):
                    continue
                attrs = info.attributes
                perms = getattr(attrs, "permissions", None)
                yield GuestFile(path=join(path, name, windows=self.windows), name=name,
                                type=str(info.type), size=int(info.size or 0), mtime=_mtime(attrs),
                                permissions=int(perms) if perms is not None else None)
            index += len(files)
            if not files or not result.remaining:
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
        info = self._call(f"download {path}", "InitiateFileTransferFromGuest", guestFilePath=path)
        url = urlsplit(transfer_url(str(info.url), self.vm.host.address if self.vm.host else ""))
        if url.scheme != "https" or not url.hostname:
            raise errors.GuestError(f"{what}: unexpected transfer URL scheme {url.scheme!r}")
        client = _transfer_client(url.netloc, self.vm.host, self._conn.trust)
        target = f"{url.path or '/'}?{url.query}" if url.query else (url.path or "/")
        response = client.get(url.hostname, url.port or 443, target, what=what)
        if response.status == 404:
            response.close()
            raise errors.GuestFileNotFound(f"{what}: gone (HTTP 404)")
        if response.status != 200:
            response.close()
            raise errors.TransientError(f"{what}: HTTP {response.status}")
        return Download(path=path, size=int(info.size), _response=response)

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


class _Sized:
    """File-like with a length, so requests streams it with Content-Length (not chunked)."""

    def __init__(self, body: SupportsRead, size: int) -> None:
        self._body = body
        self._size = size

    def __len__(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        return self._body.read(CHUNK if n is None or n < 0 else n)
