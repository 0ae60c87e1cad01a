"""Signature versions: import bundles, compile and check them, store, activate, roll back.

Called by ``engine.Engine`` and the CLI (``signatures import|list|activate|rollback``);
calls yara-python (compile, save, load), the file system and the audit log its caller hands
it (a ``models.Audit`` and the actor to record). A store opened without one reads versions
(list, active version, load) and refuses every change: each import, activation and rollback
is audited (``signatures.import`` / ``.activate`` / ``.rollback``), the built-in bundle a
new installation gets included.

Layout under ``<state_dir>/signatures/``::

    lock                 fcntl lock serialising imports and switches between processes
    state.json           {"active": N, "history": [previously active versions]}
    v0001/manifest.json  version, content hash, counts, externals used, import time, skipped
    v0001/rules.yarc     compiled rules (yara.Rules.save): startup never recompiles
    v0001/rules-non-pe.yarc  the same verdicts for files not starting with "MZ", without
                         the pe module (see partition.py); absent when not possible
    v0001/hashes.tsv     "<sha256>\t<threat>\t<list file>" lines

A version directory is written under a temporary name and renamed into place, and
``state.json`` is replaced with ``os.replace``: a reader sees the old or the new version,
never half of one. A scan pins a version object once (see ``engine.Session``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import yara

from vsphere_av.engine.matcher import EXTERNAL_DEFAULTS, externals_used
from vsphere_av.engine.partition import non_pe_source
from vsphere_av.errors import SignatureError
from vsphere_av.models import Audit

RULE_SUFFIXES = (".yar", ".yara")
HASH_SUFFIX = ".sha256"
MAX_BUNDLE_FILES = 20_000
MAX_BUNDLE_BYTES = 512 * 1024 * 1024
MAX_HASH_ENTRIES = 5_000_000
_HASH_LINE = re.compile(r"^([0-9A-Fa-f]{64})\s+(\S.*?)\s*$")
_YARA_ERROR = re.compile(r"^(?:.*?)\((\d+)\):\s*(.*)$")


@dataclass(frozen=True)
class VersionInfo:
    """What `signatures list` shows about one stored version."""

    version: int
    content_hash: str
    rule_count: int
    hash_entries: int
    imported_at: str
    source: str
    externals: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    active: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"version": self.version, "hash": self.content_hash, "rules": self.rule_count,
                "hash_entries": self.hash_entries, "imported_at": self.imported_at,
                "source": self.source, "externals": list(self.externals),
                "skipped": list(self.skipped), "active": self.active}


@dataclass(frozen=True)
class LoadedVersion:
    """One stored version; its compiled rules and hash list are read on first use."""

    version: int
    directory: Path
    externals: frozenset[str] = field(default_factory=frozenset)

    @cached_property
    def _compiled(self) -> tuple[yara.Rules, yara.Rules | None]:
        try:
            rules = yara.load(str(self.directory / "rules.yarc"))
            non_pe_path = self.directory / "rules-non-pe.yarc"
            non_pe = yara.load(str(non_pe_path)) if non_pe_path.exists() else None
        except (OSError, yara.Error) as exc:
            raise SignatureError(f"signature version {self.version} cannot be loaded: {exc}"
                                 ) from exc
        return rules, non_pe

    @cached_property
    def _hash_tables(self) -> tuple[dict[str, str], dict[str, str]]:
        hashes: dict[str, str] = {}
        lists: dict[str, str] = {}
        try:
            with (self.directory / "hashes.tsv").open("r", encoding="utf-8") as fh:
                for line in fh:
                    sha, threat, rel = line.rstrip("\n").split("\t", 2)
                    hashes[sha] = threat
                    lists[sha] = rel
        except (OSError, ValueError) as exc:
            raise SignatureError(f"signature version {self.version} cannot be loaded: {exc}"
                                 ) from exc
        return hashes, lists

    @property
    def rules(self) -> yara.Rules:
        """All compiled rules."""
        return self._compiled[0]

    @property
    def non_pe(self) -> yara.Rules | None:
        """Same verdicts for files not starting with "MZ", without the costly pe module."""
        return self._compiled[1]

    @property
    def hashes(self) -> dict[str, str]:
        """SHA-256 -> threat name."""
        return self._hash_tables[0]

    @property
    def hash_lists(self) -> dict[str, str]:
        """SHA-256 -> the list file that named it."""
        return self._hash_tables[1]


@dataclass(frozen=True)
class ImportResult:
    """The new version and the files `--skip-invalid` left out."""

    info: VersionInfo
    skipped: tuple[str, ...]


def _check_rule_file(path: Path, rel: str) -> tuple[str | None, int]:
    """(None, rule count) when the file compiles alone, else ('file line N: reason', 0)."""
    try:
        compiled = yara.compile(filepath=str(path), externals=EXTERNAL_DEFAULTS, includes=False)
    except yara.SyntaxError as exc:
        text = str(exc)
        m = _YARA_ERROR.match(text)
        if m:
            return f"{rel} line {m.group(1)}: {m.group(2)}", 0
        m2 = re.match(r"^line (\d+):\s*(.*)$", text)
        if m2:
            return f"{rel} line {m2.group(1)}: {m2.group(2)}", 0
        return f"{rel}: {text}", 0
    except yara.Error as exc:
        return f"{rel}: {exc}", 0
    return None, sum(1 for _ in compiled)


def _parse_hash_list(path: Path, rel: str, into: dict[str, tuple[str, str]]) -> str | None:
    """Add the file's entries to ``into``; None, or 'file line N: reason' for the first bad line."""
    entries: dict[str, tuple[str, str]] = {}
    try:
        with path.open("r", encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                m = _HASH_LINE.match(text)
                if not m:
                    return f"{rel} line {number}: expected '<64 hex digits> <threat name>'"
                entries[m.group(1).lower()] = (m.group(2), rel)
                if len(into) + len(entries) > MAX_HASH_ENTRIES:
                    return f"{rel} line {number}: more than {MAX_HASH_ENTRIES} hash entries"
    except UnicodeDecodeError:
        return f"{rel}: not UTF-8 text"
    into.update(entries)
    return None


def _bundle_files(root: Path) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith((*RULE_SUFFIXES, HASH_SUFFIX)):
                path = Path(dirpath) / name
                if path.is_symlink() or not path.is_file():
                    continue
                found.append((path.relative_to(root).as_posix(), path))
                if len(found) > MAX_BUNDLE_FILES:
                    raise SignatureError(f"bundle has more than {MAX_BUNDLE_FILES} signature files")
    return found


@contextlib.contextmanager
def _unpacked(source: Path) -> Iterator[Path]:
    """The bundle as a directory: itself, or a safely extracted .tar.gz."""
    if source.is_dir():
        yield source
        return
    if not source.is_file():
        raise SignatureError(f"signature bundle not found: {source}")
    if not tarfile.is_tarfile(source):
        raise SignatureError(f"{source}: not a directory or a .tar.gz bundle")
    with tempfile.TemporaryDirectory(prefix="vsphere-av-bundle-") as tmp:
        total = 0
        try:
            with tarfile.open(source, "r:*") as tar:
                members: list[tarfile.TarInfo] = []
                for member in tar:
                    if not member.isfile():
                        continue
                    if not member.name.lower().endswith((*RULE_SUFFIXES, HASH_SUFFIX)):
                        continue
                    total += member.size
                    if total > MAX_BUNDLE_BYTES or len(members) >= MAX_BUNDLE_FILES:
                        raise SignatureError(f"{source}: bundle too large")
                    members.append(member)
                tar.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise SignatureError(f"{source}: cannot unpack bundle: {exc}") from exc
        root = Path(tmp)
        entries = list(root.iterdir())
        # A tarball usually wraps everything in one top directory: paths are relative to it,
        # so the same rules give the same content hash as a directory or as a .tar.gz.
        if len(entries) == 1 and entries[0].is_dir():
            root = entries[0]
        yield root


def _compile(files: dict[str, Path]) -> yara.Rules:
    """One rule set, one namespace per file (so equal rule names in two files do not clash)."""
    try:
        if not files:
            return yara.compile(source="", externals=EXTERNAL_DEFAULTS)
        return yara.compile(filepaths={rel: str(p) for rel, p in files.items()},
                            externals=EXTERNAL_DEFAULTS, includes=False)
    except yara.Error as exc:
        raise SignatureError(f"bundle rejected: {exc}") from exc


def _compile_non_pe(non_pe: dict[str, str | None]) -> yara.Rules | None:
    """The rule set for files not starting with "MZ" (None when the bundle does not allow it).

    Texts are Latin-1 decoded rule files; they are written back byte for byte and compiled
    from files, so strings with non-UTF-8 bytes stay exactly as their authors wrote them.
    """
    if not non_pe or any(text is None for text in non_pe.values()):
        return None
    with tempfile.TemporaryDirectory(prefix="vsphere-av-non-pe-") as tmp:
        paths: dict[str, str] = {}
        for number, (rel, text) in enumerate(sorted(non_pe.items())):
            if not text:
                continue
            target = os.path.join(tmp, f"{number}.yar")
            with open(target, "wb") as fh:
                fh.write(text.encode("latin-1"))
            paths[rel] = target
        try:
            return yara.compile(filepaths=paths, externals=EXTERNAL_DEFAULTS, includes=False)
        except yara.Error:
            return None     # the analysis misread something: scan every file with all rules


class SignatureStore:
    """Versions stored under one state directory."""

    def __init__(self, *, state_dir: Path, audit: Audit | None = None, actor: str = "") -> None:
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "signatures"
        self._audit = audit
        self._actor = actor
        self._loaded: dict[int, LoadedVersion] = {}
        self._active_cache: tuple[float, int, int] | None = None

    def _writable(self) -> None:
        """Refuse a change this store could not audit (opened read-only)."""
        if self._audit is None:
            raise SignatureError("signature changes are audited: this signature store was "
                                 "opened without an audit log (read-only)")

    def _record(self, action: str, details: dict[str, Any]) -> None:
        assert self._audit is not None    # _writable() was checked before the change
        self._audit.append(actor=self._actor, action=action, details=details)

    # -- locking and state ------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "lock").open("a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read_state(self) -> dict[str, Any]:
        try:
            with (self.root / "state.json").open("r", encoding="utf-8") as fh:
                data: dict[str, Any] = json.load(fh)
                return data
        except FileNotFoundError:
            return {"active": 0, "history": []}
        except (OSError, ValueError) as exc:
            raise SignatureError(f"signature state is unreadable: {exc}") from exc

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self.root / f"state.json.{os.getpid()}.tmp"
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / "state.json")
        self._active_cache = None

    def _version_dir(self, version: int) -> Path:
        return self.root / f"v{version:04d}"

    def versions(self) -> list[int]:
        """All stored version numbers, ascending."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in self.root.iterdir():
            if entry.name.startswith("v") and entry.name[1:].isdigit() and \
                    (entry / "manifest.json").is_file():
                out.append(int(entry.name[1:]))
        return sorted(out)

    def active_version(self) -> int:
        """The active version number (0 when none)."""
        # state.json is replaced atomically: re-read it only when its mtime/inode changed.
        try:
            st = os.stat(self.root / "state.json")
        except FileNotFoundError:
            return 0
        key = (st.st_mtime_ns, st.st_ino)
        if self._active_cache and self._active_cache[:2] == key:
            return self._active_cache[2]
        version = int(self._read_state().get("active", 0))
        self._active_cache = (key[0], key[1], version)
        return version

    def info(self, version: int) -> VersionInfo:
        """Manifest of one version."""
        path = self._version_dir(version) / "manifest.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise SignatureError(f"signature version {version} does not exist") from exc
        return VersionInfo(
            version=int(data["version"]), content_hash=data["hash"], rule_count=int(data["rules"]),
            hash_entries=int(data["hash_entries"]), imported_at=data["imported_at"],
            source=data.get("source", ""), externals=tuple(data.get("externals", [])),
            skipped=tuple(data.get("skipped", [])), active=version == self.active_version())

    def infos(self) -> list[VersionInfo]:
        """Every stored version with its manifest."""
        return [self.info(v) for v in self.versions()]

    # -- import -----------------------------------------------------------------------
    def import_bundle(self, source: Path, *, skip_invalid: bool = False, activate: bool = True,
                      audit: bool = True, label: str = "", only_if_new: bool = False,
                      ) -> ImportResult:
        """Compile and check a bundle; store it as the next version (and activate it)."""
        if audit:
            self._writable()
        source = Path(source)
        with _unpacked(source) as root:
            files = _bundle_files(root)
            rule_files: dict[str, Path] = {}
            non_pe: dict[str, str | None] = {}
            rule_count = 0
            hashes: dict[str, tuple[str, str]] = {}
            problems: list[str] = []
            digest = hashlib.sha256()
            used: set[str] = set()
            total = 0
            for rel, path in files:
                total += path.stat().st_size
                if total > MAX_BUNDLE_BYTES:
                    raise SignatureError(f"{source}: bundle larger than {MAX_BUNDLE_BYTES} bytes")
                if rel.lower().endswith(HASH_SUFFIX):
                    problem = _parse_hash_list(path, rel, hashes)
                else:
                    problem, count = _check_rule_file(path, rel)
                    if problem is None:
                        # Latin-1 maps every byte to one character and back.
                        text = path.read_text(encoding="latin-1")
                        rule_files[rel] = path
                        non_pe[rel] = non_pe_source(text, expected_rules=count)
                        rule_count += count
                        used |= externals_used(text)
                if problem is not None:
                    if not skip_invalid:
                        raise SignatureError(f"bundle rejected: {problem}")
                    problems.append(problem)
                    continue
                digest.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
            if not rule_files and not hashes:
                raise SignatureError(
                    f"{source}: no valid .yar/.yara rule files or .sha256 hash lists")
            rules = _compile(rule_files)
            non_pe_rules = _compile_non_pe(non_pe)
            content_hash = digest.hexdigest()
            with self._locked():
                if only_if_new and self.versions():
                    # Another process set up this state directory meanwhile.
                    current = self.active_version() or self.versions()[-1]
                    return ImportResult(info=self.info(current), skipped=())
                version = max(self.versions(), default=0) + 1
                final = self._version_dir(version)
                tmp = self.root / f".v{version:04d}.{os.getpid()}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                rules.save(str(tmp / "rules.yarc"))
                if non_pe_rules is not None:
                    non_pe_rules.save(str(tmp / "rules-non-pe.yarc"))
                with (tmp / "hashes.tsv").open("w", encoding="utf-8") as fh:
                    for sha, (threat, rel) in sorted(hashes.items()):
                        fh.write(f"{sha}\t{threat}\t{rel}\n")
                manifest = {
                    "version": version, "hash": content_hash, "rules": rule_count,
                    "hash_entries": len(hashes),
                    "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "source": label or str(source), "externals": sorted(used), "skipped": problems,
                }
                (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
                os.rename(tmp, final)
                if audit:
                    self._record("signatures.import", {
                        "version": version, "hash": content_hash, "rules": rule_count,
                        "hash_entries": len(hashes), "source": label or str(source),
                        "skipped": len(problems)})
                if activate:
                    self._activate_locked(version, audit=audit)
        return ImportResult(info=self.info(version), skipped=tuple(problems))

    def ensure_builtin(self) -> None:
        """On a new installation, import and activate the built-in EICAR bundle."""
        if self.active_version():
            return
        with self._locked():
            if self._read_state().get("active"):
                return
            existing = self.versions()
            if existing:   # versions but none active (should not happen): activate the newest
                self._activate_locked(existing[-1], audit=True)
                return
        builtin = resources.files("vsphere_av.engine") / "builtin"
        with resources.as_file(builtin) as path:
            self.import_bundle(Path(path), activate=True, audit=True, label="built-in (EICAR)",
                               only_if_new=True)

    # -- switching --------------------------------------------------------------------
    def _activate_locked(self, version: int, *, audit: bool, action: str = "signatures.activate",
                         history: list[int] | None = None) -> None:
        if audit:
            self._writable()
        if version not in self.versions():
            raise SignatureError(f"signature version {version} does not exist")
        state = self._read_state()
        previous = int(state.get("active", 0))
        if history is None:
            history = [int(v) for v in state.get("history", [])]
            if previous and previous != version:
                history.append(previous)
        self._write_state({"active": version, "history": history[-100:]})
        if audit:
            self._record(action, {"version": version, "previous": previous})

    def activate(self, version: int) -> VersionInfo:
        """Make ``version`` the active one (atomic for every scan that starts afterwards)."""
        with self._locked():
            self._activate_locked(version, audit=True)
        return self.info(version)

    def rollback(self) -> VersionInfo:
        """Go back to the previously active version."""
        self._writable()
        with self._locked():
            state = self._read_state()
            history = [int(v) for v in state.get("history", [])]
            existing = set(self.versions())
            while history and history[-1] not in existing:
                history.pop()
            if not history:
                raise SignatureError("nothing to roll back to: no previously active version")
            target = history.pop()
            self._activate_locked(target, audit=True, action="signatures.rollback",
                                  history=history)
        return self.info(target)

    # -- loading ----------------------------------------------------------------------
    def load(self, version: int) -> LoadedVersion:
        """One version (its rules and hashes are read once per process, on first use)."""
        loaded = self._loaded.get(version)
        if loaded is not None:
            return loaded
        directory = self._version_dir(version)
        try:
            manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SignatureError(f"signature version {version} cannot be loaded: {exc}") from exc
        loaded = LoadedVersion(version=version, directory=directory,
                               externals=frozenset(manifest.get("externals", [])))
        self._loaded[version] = loaded
        return loaded
