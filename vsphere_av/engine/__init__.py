"""The scan engine: is this file malicious? Usable on its own, without vSphere.

Called by the CLI (``scan-files``), guest scans (``scan.job``, through
``Session.scan_stream`` with chunks from an HTTP download) and the engine service; calls
``signatures`` (versions), ``matcher`` (YARA + hash list), ``archives`` and ``cache``.

    engine = Engine.open(settings, audit=audit_log, actor="alice")
    with engine.session() as s:              # pins one signature version for the whole scan
        outcome = s.scan_stream(chunks, path="/etc/passwd", owner="root")

Memory stays bounded: a stream is buffered in memory up to ``spool_threshold`` bytes and
spooled to a temporary file beyond that (libyara then maps the file); streams longer than
``max_file_size`` are not read further and come back "skipped". Nested archives are opened
up to ``archive_max_depth`` with the same rule, so at most depth x threshold bytes are held.

An archive that crosses a limit (depth, members, total extracted size, compression ratio,
a member over ``max_file_size``) was not checked to its end. With ``alert_exceeds_max`` on
(the default, as ClamAV's ``--alert-exceeds-max``) that is a detection of its own,
``Heuristics.Limits.Exceeded.<limit>`` (source ``limit``); otherwise the file comes back
"skipped" with the reason, which a guest scan counts as incomplete. Anything "skipped" or
"error" means: not every byte was checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import yara

from vsphere_av.engine import archives
from vsphere_av.engine.cache import CachedVerdict, VerdictCache
from vsphere_av.engine.matcher import (
    HEAD_SIZE,
    NAME_EXTERNALS,
    Matcher,
    externals_for,
    split_name,
    utf8_name,
)
from vsphere_av.engine.signatures import LoadedVersion, SignatureStore
from vsphere_av.errors import EngineError
from vsphere_av.models import Audit

__all__ = ["Detection", "Engine", "FileOutcome", "Received", "Session"]

Status = Literal["clean", "infected", "skipped", "error"]
READ_CHUNK = 1024 * 1024
TOO_LARGE = "larger than max file size"
LIMIT_THREAT = "Heuristics.Limits.Exceeded."


@dataclass(frozen=True)
class Detection:
    """One hit: threat name, where it came from and which member of the file matched."""

    threat: str
    source: Literal["yara", "hash", "limit"]
    rule: str
    member: str = ""   # "outer.zip!dir/inner.exe", or "" for the file itself


@dataclass(frozen=True)
class FileOutcome:
    """The verdict on one file."""

    path: str
    status: Status
    sha256: str
    size: int
    detections: tuple[Detection, ...] = ()
    reason: str = ""
    cached: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"path": self.path, "status": self.status, "sha256": self.sha256,
                "size": self.size, "reason": self.reason, "cached": self.cached,
                "detections": [{"threat": d.threat, "source": d.source, "rule": d.rule,
                                "member": d.member} for d in self.detections]}


@dataclass
class _Blob:
    """A fully received file or member: in memory or in a spool file, plus its hash."""

    sha256: str
    size: int
    head: bytes
    data: bytes | None = None
    path: str | None = None


@dataclass
class Received:
    """A file taken in by ``Session.receive``: hashed and held, or why it was not."""

    blob: _Blob | None = None
    status: Status = "clean"       # "skipped" or "error" when there is no blob
    size: int = 0
    reason: str = ""
    spool: _Spool | None = None

    def discard(self) -> None:
        """Free the memory or spool file (idempotent)."""
        if self.spool is not None:
            self.spool.discard()
            self.spool = None
        self.blob = None


@dataclass
class _Findings:
    """What one top-level file produced, members included."""

    detections: list[Detection] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Spool:
    """Collects chunks in memory up to a threshold, then in a temporary file."""

    def __init__(self, *, threshold: int, directory: str | None) -> None:
        self._threshold = threshold
        self._directory = directory
        self._parts: list[bytes] = []
        self._held = 0
        self._file: IO[bytes] | None = None
        self.path: str | None = None

    def write(self, chunk: bytes) -> None:
        if self._file is None and self._held + len(chunk) > self._threshold:
            fd, self.path = tempfile.mkstemp(prefix="vsphere-av-spool-", dir=self._directory)
            self._file = os.fdopen(fd, "wb")
            for part in self._parts:
                self._file.write(part)
            self._parts.clear()
        if self._file is not None:
            self._file.write(chunk)
        else:
            self._parts.append(chunk)
            self._held += len(chunk)

    def finish(self) -> tuple[bytes | None, str | None]:
        """(data, None) when held in memory, (None, path) when spooled."""
        if self._file is not None:
            self._file.close()
            return None, self.path
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts = []
        return data, None

    def discard(self) -> None:
        """Delete the spool file, if any."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._parts = []


class _TooLarge(Exception):
    pass


def _close(chunks: Iterable[bytes]) -> None:
    close = getattr(chunks, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()


def _limits_fingerprint(settings: Any) -> str:
    e = settings.engine
    raw = (f"{e.max_file_size}/{e.archive_max_depth}/{e.archive_max_members}/"
           f"{e.archive_max_total_size}/{e.archive_max_ratio}")
    if not e.alert_exceeds_max:    # limit detections (cached) belong to the alerting setting
        raw += "/no-alert"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def cacheable(outcome: FileOutcome) -> CachedVerdict:
    """What the verdict cache stores of an outcome (member paths without the file's name)."""
    return CachedVerdict(status=outcome.status, reason=outcome.reason, detections=tuple(
        (d.threat, d.source, d.rule, "!" + d.member.split("!", 1)[1] if "!" in d.member else "")
        for d in outcome.detections))


class Session:
    """Scans with one pinned signature version (use through ``Engine.session()``)."""

    def __init__(self, *, loaded: LoadedVersion, settings: Any, cache: VerdictCache | None,
                 spool_dir: str | None = None, cache_writes: bool = True) -> None:
        self._loaded = loaded
        self._cache_writes = cache_writes
        self._settings = settings
        self._limits = settings.engine
        self._cache = cache
        self._spool_dir = spool_dir
        self._matcher_obj: Matcher | None = None
        self._fingerprint = _limits_fingerprint(settings)
        self.version: int = loaded.version
        self.uses_name_externals: bool = bool(loaded.externals & NAME_EXTERNALS)
        self.uses_owner: bool = "owner" in loaded.externals

    @property
    def _matcher(self) -> Matcher:
        if self._matcher_obj is None:
            loaded = self._loaded
            self._matcher_obj = Matcher(rules=loaded.rules, hashes=loaded.hashes,
                                        hash_list_names=loaded.hash_lists, non_pe=loaded.non_pe)
        return self._matcher_obj

    # -- cache ------------------------------------------------------------------------
    def cache_context(self, *, path: str, name: str | None = None, owner: str = "") -> str:
        """The part of the cache key besides content and version."""
        context = self._fingerprint
        if self.uses_name_externals:
            context += "|" + "\0".join(split_name(path, name))
        if self.uses_owner:
            context += "|owner=" + owner
        context = utf8_name(context)      # names that are not UTF-8 (surrogate escapes)
        return context

    def lookup(self, sha256: str, *, path: str, name: str | None = None, owner: str = "",
               size: int = -1) -> FileOutcome | None:
        """Verdict-cache hit for this content under this version (and name when relevant)."""
        if self._cache is None:
            return None
        hit = self._cache.get(sha256, self.version, self.cache_context(path=path, name=name,
                                                                        owner=owner))
        if hit is None:
            return None
        return self._from_cached(hit, path=path, sha256=sha256, size=size, name=name)

    def _from_cached(self, hit: CachedVerdict, *, path: str, sha256: str, size: int,
                     name: str | None = None) -> FileOutcome:
        # Members are cached without the file's own name ("!dir/x.exe"): the same content
        # may come back under another name.
        base = name if name is not None else split_name(path)[0]
        detections = tuple(Detection(threat=t, source=s, rule=r,  # type: ignore[arg-type]
                                     member=base + m if m.startswith("!") else m)
                           for t, s, r, m in hit.detections)
        return FileOutcome(path=path, status=hit.status, sha256=sha256,  # type: ignore[arg-type]
                           size=size, detections=detections, reason=hit.reason, cached=True)

    def _remember(self, outcome: FileOutcome, context: str) -> None:
        if self._cache is None or not self._cache_writes or \
                outcome.status not in ("clean", "infected"):
            return
        self._cache.put(outcome.sha256, self.version, context, cacheable(outcome))

    # -- scanning ---------------------------------------------------------------------
    def scan_stream(self, chunks: Iterable[bytes], *, path: str, name: str | None = None,
                    owner: str = "", size_hint: int | None = None) -> FileOutcome:
        """Scan a file arriving as chunks; never holds more than spool_threshold in memory."""
        return self.scan_received(self.receive(chunks, size_hint=size_hint), path=path,
                                  name=name, owner=owner)

    def receive(self, chunks: Iterable[bytes], *, size_hint: int | None = None) -> Received:
        """Take a file in (hash it, hold it in memory or a spool file) without matching it.

        The I/O half of :meth:`scan_stream`, so that one thread can receive the next file
        while another matches this one. Hand the result to :meth:`scan_received` (which
        frees it) or call its ``discard()``.
        """
        max_size = self._limits.max_file_size
        if size_hint is not None and size_hint > max_size:
            _close(chunks)
            return Received(status="skipped", size=size_hint, reason=TOO_LARGE)
        spool = _Spool(threshold=self._limits.spool_threshold, directory=self._spool_dir)
        try:
            return Received(blob=self._receive(chunks, spool, max_size), spool=spool)
        except _TooLarge as exc:
            spool.discard()
            return Received(status="skipped", size=int(str(exc)), reason=TOO_LARGE)
        except OSError as exc:
            spool.discard()
            return Received(status="error", reason=f"read failed: {exc.strerror or exc}")
        except Exception as exc:   # the producer (e.g. an HTTP download) failed
            spool.discard()
            return Received(status="error", reason=f"read failed: {type(exc).__name__}: {exc}")
        except BaseException:
            spool.discard()
            raise

    def scan_received(self, received: Received, *, path: str, name: str | None = None,
                      owner: str = "") -> FileOutcome:
        """The verdict on a file from :meth:`receive`; frees what it held."""
        try:
            if received.blob is None:
                return FileOutcome(path=path, status=received.status, sha256="",
                                   size=received.size, reason=received.reason)
            return self._verdict(received.blob, path=path, name=name, owner=owner)
        finally:
            received.discard()

    def scan_file(self, path: os.PathLike[str] | str) -> FileOutcome:
        """Scan a local file."""
        text = os.fspath(path)
        try:
            st = os.stat(text)
        except OSError as exc:
            return FileOutcome(path=text, status="error", sha256="", size=0,
                               reason=f"cannot stat: {exc.strerror or exc}")
        owner = _owner_name(st.st_uid)
        if st.st_size > self._limits.max_file_size:
            return FileOutcome(path=text, status="skipped", sha256="", size=st.st_size,
                               reason=TOO_LARGE)
        try:
            fh = open(text, "rb")  # noqa: SIM115 - closed in finally
        except OSError as exc:
            return FileOutcome(path=text, status="error", sha256="", size=st.st_size,
                               reason=f"cannot open: {exc.strerror or exc}")
        try:
            if st.st_size <= self._limits.spool_threshold:
                return self.scan_stream(iter(lambda: fh.read(READ_CHUNK), b""), path=text,
                                        owner=owner, size_hint=st.st_size)
            # Large local file: hash it streaming, then let libyara map the file itself.
            digest = hashlib.sha256()
            head = b""
            size = 0
            for chunk in iter(lambda: fh.read(READ_CHUNK), b""):
                if not head:
                    head = chunk[:512]
                digest.update(chunk)
                size += len(chunk)
                if size > self._limits.max_file_size:
                    return FileOutcome(path=text, status="skipped", sha256="", size=size,
                                       reason=TOO_LARGE)
            blob = _Blob(sha256=digest.hexdigest(), size=size, head=head, path=text)
            return self._verdict(blob, path=text, name=None, owner=owner)
        except OSError as exc:
            return FileOutcome(path=text, status="error", sha256="", size=st.st_size,
                               reason=f"read failed: {exc.strerror or exc}")
        finally:
            fh.close()

    def _receive(self, chunks: Iterable[bytes], spool: _Spool, max_size: int) -> _Blob:
        digest = hashlib.sha256()
        size = 0
        head = b""
        try:
            for chunk in chunks:
                if not chunk:
                    continue
                size += len(chunk)
                if size > max_size:
                    raise _TooLarge(str(size))
                if len(head) < 512:
                    head += bytes(chunk[: 512 - len(head)])
                digest.update(chunk)
                spool.write(bytes(chunk) if not isinstance(chunk, bytes) else chunk)
        finally:
            # Stop the producer (e.g. an HTTP download) whether we finished or gave up.
            _close(chunks)
        data, spooled = spool.finish()
        return _Blob(sha256=digest.hexdigest(), size=size, head=head, data=data, path=spooled)

    def _verdict(self, blob: _Blob, *, path: str, name: str | None, owner: str) -> FileOutcome:
        context = self.cache_context(path=path, name=name, owner=owner)
        if self._cache is not None:
            hit = self._cache.get(blob.sha256, self.version, context)
            if hit is not None:
                return self._from_cached(hit, path=path, sha256=blob.sha256, size=blob.size,
                                         name=name)
        outcome = self.analyse(blob, path=path, name=name, owner=owner)
        self._remember(outcome, context)
        return outcome

    def analyse(self, blob: _Blob, *, path: str, name: str | None, owner: str) -> FileOutcome:
        """Full scan of a received file (no cache)."""
        findings = _Findings()
        budget = archives.Budget(max_members=self._limits.archive_max_members,
                                 max_total=self._limits.archive_max_total_size,
                                 max_ratio=max(1, self._limits.archive_max_ratio))
        base = name if name is not None else split_name(path)[0]
        try:
            self._analyse(blob, path=path, name=name, owner=owner, depth=0, label=base,
                          member="", budget=budget, findings=findings)
        except yara.TimeoutError:
            return FileOutcome(path=path, status="error", sha256=blob.sha256, size=blob.size,
                               detections=tuple(findings.detections), reason="yara timed out")
        except yara.Error as exc:
            return FileOutcome(path=path, status="error", sha256=blob.sha256, size=blob.size,
                               detections=tuple(findings.detections), reason=f"yara: {exc}")
        except OSError as exc:
            return FileOutcome(path=path, status="error", sha256=blob.sha256, size=blob.size,
                               detections=tuple(findings.detections),
                               reason=f"read failed: {exc.strerror or exc}")
        detections = tuple(dict.fromkeys(findings.detections))
        reason = "; ".join(findings.notes[:5])
        if detections:
            return FileOutcome(path=path, status="infected", sha256=blob.sha256, size=blob.size,
                               detections=detections, reason=reason)
        if findings.notes:
            return FileOutcome(path=path, status="skipped", sha256=blob.sha256, size=blob.size,
                               reason=reason)
        return FileOutcome(path=path, status="clean", sha256=blob.sha256, size=blob.size)

    def _analyse(self, blob: _Blob, *, path: str, name: str | None, owner: str, depth: int,
                 label: str, member: str, budget: archives.Budget, findings: _Findings) -> None:
        externals = externals_for(path=path, name=name, head=blob.head[:HEAD_SIZE * 8],
                                  owner=owner)
        hits = self._matcher.match_hash(blob.sha256)
        if blob.data is not None:
            hits += self._matcher.match_data(blob.data, externals)
        else:
            assert blob.path is not None
            hits += self._matcher.match_file(blob.path, externals, head=blob.head)
        for hit in hits:
            findings.detections.append(Detection(threat=hit.threat, source=hit.source,  # type: ignore[arg-type]
                                                 rule=hit.rule, member=member))
        kind = archives.kind_of(blob.head)
        if not kind:
            return
        if depth >= self._limits.archive_max_depth:
            self._exceeded(archives.MAX_DEPTH, f"archive depth limit "
                           f"({self._limits.archive_max_depth}) reached at {label}",
                           member=member, findings=findings)
            return
        try:
            for item in archives.members(kind=kind, data=blob.data, path=blob.path,
                                         name=label.rsplit("!", 1)[-1].rsplit("/", 1)[-1],
                                         label=label, compressed=blob.size, budget=budget):
                if isinstance(item, archives.Limit):
                    self._exceeded(item.name, item.reason, member=member, findings=findings)
                    return
                if isinstance(item, archives.Skip):
                    if item.name:
                        findings.notes.append(f"{item.reason}: {label}!{item.name}")
                    continue
                self._member(item, path=path, owner=owner, depth=depth, label=label,
                             budget=budget, findings=findings)
        except archives.ArchiveLimit as exc:
            self._exceeded(exc.name, str(exc), member=member, findings=findings)
        except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError, KeyError,
                IndexError, archives.zlib_error(), _tar_error(), _zip_error(), _lzma_error()):
            # A damaged or truncated archive: its raw bytes were scanned above; that is all
            # anyone can do with it (clamscan and yara behave the same way).
            return

    def _exceeded(self, limit: str, reason: str, *, member: str, findings: _Findings) -> None:
        """An archive (``member``: where in the file, "" for the file itself) crossed a limit."""
        findings.notes.append(reason)
        if self._limits.alert_exceeds_max:
            findings.detections.append(Detection(threat=LIMIT_THREAT + limit, source="limit",
                                                 rule=limit, member=member))

    def _member(self, item: archives.Member, *, path: str, owner: str, depth: int, label: str,
                budget: archives.Budget, findings: _Findings) -> None:
        member_label = f"{label}!{item.name}"
        if item.size > self._limits.max_file_size:
            self._exceeded(archives.MAX_FILE_SIZE, f"{TOO_LARGE}: {member_label}",
                           member=member_label, findings=findings)
            return
        spool = _Spool(threshold=self._limits.spool_threshold, directory=self._spool_dir)
        try:
            try:
                blob = self._receive(item.open(), spool, self._limits.max_file_size)
            except _TooLarge:
                self._exceeded(archives.MAX_FILE_SIZE, f"{TOO_LARGE}: {member_label}",
                               member=member_label, findings=findings)
                return
            inner_dir, inner_name = (item.name.rsplit("/", 1) if "/" in item.name
                                     else ("", item.name))
            member_path = f"{path}!{inner_dir}/{inner_name}" if inner_dir \
                else f"{path}!{inner_name}"
            self._analyse(blob, path=member_path, name=inner_name, owner=owner, depth=depth + 1,
                          label=member_label, member=member_label, budget=budget,
                          findings=findings)
        finally:
            spool.discard()


def _tar_error() -> type[Exception]:
    import tarfile

    return tarfile.TarError


def _zip_error() -> type[Exception]:
    import zipfile

    return zipfile.BadZipFile


def _lzma_error() -> type[Exception]:
    import lzma

    return lzma.LZMAError


_OWNERS: dict[int, str] = {}


def _owner_name(uid: int) -> str:
    """User name of a uid (cached), or the number when unknown."""
    name = _OWNERS.get(uid)
    if name is None:
        try:
            import pwd

            name = pwd.getpwuid(uid).pw_name
        except (KeyError, ImportError):
            name = str(uid)
        _OWNERS[uid] = name
    return name


class Engine:
    """Signature store + verdict cache of one state directory."""

    def __init__(self, *, settings: Any, store: SignatureStore, cache: VerdictCache | None) -> None:
        self.settings = settings
        self.store = store
        self.cache = cache
        self._lock = threading.Lock()

    @classmethod
    def open(cls, settings: Any, *, audit: Audit | None = None, actor: str = "",
             use_cache: bool = True) -> Engine:
        """Open the engine of ``settings.state_dir`` (imports the built-in bundle when new).

        ``audit`` (with ``actor``) records signature changes, that import included; without
        it the store is read-only and a state directory without signatures is an error.
        """
        state_dir = Path(settings.state_dir)
        store = SignatureStore(state_dir=state_dir, audit=audit, actor=actor)
        store.ensure_builtin()
        cache = VerdictCache.open(state_dir, max_entries=settings.engine.cache_max_entries) \
            if use_cache else None
        return cls(settings=settings, store=store, cache=cache)

    def active_version(self) -> int:
        """The active signature version number."""
        version = self.store.active_version()
        if not version:
            raise EngineError("no active signature version")
        return version

    @contextlib.contextmanager
    def session(self, *, version: int | None = None, lazy: bool = False) -> Iterator[Session]:
        """Pin one signature version (the active one by default) for a whole scan.

        The rules are loaded now (a broken version fails here, not mid-scan) unless ``lazy``:
        then on the first file that needs them (a pass answered by the cache never loads them).
        """
        with self._lock:
            loaded = self.store.load(version or self.active_version())
            if not lazy:
                _ = loaded.rules, loaded.hashes
        session = Session(loaded=loaded, settings=self.settings, cache=self.cache)
        try:
            yield session
        finally:
            if self.cache is not None:
                self.cache.flush()

    def close(self) -> None:
        """Flush and close the verdict cache."""
        if self.cache is not None:
            self.cache.close()
