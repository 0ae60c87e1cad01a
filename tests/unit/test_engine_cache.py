"""Unit tests of the verdict cache: keys, versions, LRU bound, the local-file memo."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from vsphere_av.engine.cache import CachedVerdict, FileStat, VerdictCache

CLEAN = CachedVerdict(status="clean", reason="", detections=())
BAD = CachedVerdict(status="infected", reason="",
                    detections=(("Trojan.X", "yara", "ns:rule", "a.zip!b.exe"),))


def sha(n: int) -> str:
    return f"{n:064x}"


def test_versions_and_contexts_never_mix(tmp_path: Path) -> None:
    cache = VerdictCache.open(tmp_path, max_entries=100)
    cache.put(sha(1), 1, "", BAD)
    cache.put(sha(1), 1, "ctx-a", CLEAN)
    assert cache.get(sha(1), 1, "") == BAD          # served from the write buffer
    cache.flush()
    assert cache.get(sha(1), 1, "") == BAD          # and from the database
    assert cache.get(sha(1), 1, "ctx-a") == CLEAN
    assert cache.get(sha(1), 2, "") is None         # a new version never reuses old verdicts
    assert cache.get(sha(1), 1, "ctx-b") is None
    assert cache.get(sha(2), 1, "") is None
    cache.close()
    again = VerdictCache.open(tmp_path, max_entries=100)   # persistent
    assert again.get(sha(1), 1, "") == BAD
    again.close()


def test_lru_bound_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = VerdictCache.open(tmp_path, max_entries=20)
    for n in range(20):
        cache.put(sha(n), 1, "", CLEAN)
    cache.flush()
    db = sqlite3.connect(tmp_path / "verdicts.sqlite")
    # Make entries 0..9 old, and 0 recently used again (as a hit an hour later would).
    db.execute("UPDATE verdicts SET last_used = last_used - 100000")
    db.commit()
    db.close()
    assert cache.get(sha(0), 1, "") == CLEAN        # refreshes its last_used (buffered)
    cache.flush()
    for n in range(20, 30):
        cache.put(sha(n), 1, "", CLEAN)
    cache.flush()
    assert cache.count() <= 20
    assert cache.get(sha(0), 1, "") == CLEAN        # recently used: kept
    assert cache.get(sha(29), 1, "") == CLEAN       # newest: kept
    assert cache.get(sha(5), 1, "") is None         # oldest unused: evicted
    cache.close()


def test_file_memo_requires_identical_identity(tmp_path: Path) -> None:
    cache = VerdictCache.open(tmp_path, max_entries=100)
    old = int((time.time() - 60) * 1e9)
    st = FileStat(dev=1, ino=2, size=3, mtime_ns=old, ctime_ns=old)
    cache.remember_file(st, sha(7))
    cache.flush()
    assert cache.file_hashes([st]) == {st: sha(7)}
    changed = FileStat(dev=1, ino=2, size=3, mtime_ns=old, ctime_ns=old + 1)
    assert cache.file_hashes([changed]) == {}
    cache.close()


def test_file_memo_ignores_files_changed_just_now(tmp_path: Path) -> None:
    cache = VerdictCache.open(tmp_path, max_entries=100)
    target = tmp_path / "fresh"
    target.write_bytes(b"x")
    s = os.stat(target)
    st = FileStat(dev=s.st_dev, ino=s.st_ino, size=s.st_size, mtime_ns=s.st_mtime_ns,
                  ctime_ns=s.st_ctime_ns)
    cache.remember_file(st, sha(9))
    cache.flush()
    assert cache.file_hashes([st]) == {}
    cache.close()
