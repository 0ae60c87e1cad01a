"""The scan policy's path filters: which directories a walk prunes, which files it scans.

Pure functions over guest paths, called by ``scan.job`` (one :class:`Filters` per scan,
built from ``config.ScanPolicy`` for the guest's OS family) and table-tested in
``tests/unit/test_scan_policy.py``. Calls nothing but ``fnmatch`` and ``re``.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from vsphere_av.config import ScanPolicy

GLOB_CHARS = frozenset("*?[")


def normalise(path: str, *, windows: bool) -> str:
    """Path as filters see it: forward slashes, lower case on Windows."""
    return path.replace("\\", "/").lower() if windows else path


def _pattern(pattern: str, *, windows: bool) -> str:
    p = pattern.replace("\\", "/") if windows else pattern
    p = p.lower() if windows else p
    return p.rstrip("/") if len(p) > 1 and not p.endswith(":/") else p


def matches(pattern: str, path: str, *, windows: bool) -> bool:
    """Does a policy pattern match a guest path?

    A pattern without wildcards is a path prefix (``/proc`` covers ``/proc/1/maps``); one
    with wildcards and a slash is a glob on the whole path (``*/pagefile.sys``); one with
    wildcards and no slash is a glob on the file name (``*.iso``). Windows: case-insensitive,
    ``\\`` and ``/`` alike.
    """
    return _compile(pattern, windows=windows)(normalise(path, windows=windows))


def _compile(pattern: str, *, windows: bool) -> Callable[[str], bool]:
    """A test on normalised paths equivalent to :func:`matches` for one pattern."""
    p = _pattern(pattern, windows=windows)
    if not GLOB_CHARS & set(p):
        if p in ("/", "c:/") or p.endswith(":/"):
            return lambda target: target.startswith(p)
        below = p + "/"
        return lambda target: target == p or target.startswith(below)
    glob = re.compile(fnmatch.translate(p)).match
    if "/" in p:
        return lambda target: glob(target) is not None
    return lambda target: glob(target.rsplit("/", 1)[-1]) is not None


@dataclass(frozen=True)
class Filters:
    """The policy's include/exclude rules for one guest OS family."""

    excludes: tuple[str, ...]
    includes: tuple[str, ...]
    max_file_size: int
    windows: bool

    @classmethod
    def from_policy(cls, policy: ScanPolicy, *, windows: bool,
                    engine_max: int | None = None) -> Filters:
        """Filters of ``policy`` (default exclusions first) for a Linux or Windows guest."""
        limit = policy.max_file_size
        if engine_max is not None:
            limit = min(limit, engine_max)
        return cls(excludes=(*policy.default_excludes, *policy.exclude), includes=policy.include,
                   max_file_size=limit, windows=windows)

    @functools.cached_property
    def _tests(self) -> tuple[tuple[Callable[[str], bool], ...], tuple[Callable[[str], bool], ...]]:
        # Compiled once per scan: every listed file is checked against every pattern.
        return (tuple(_compile(p, windows=self.windows) for p in self.excludes),
                tuple(_compile(p, windows=self.windows) for p in self.includes))

    def prune(self, directory: str) -> bool:
        """True when a directory is excluded as a whole."""
        target = normalise(directory, windows=self.windows)
        return any(test(target) for test in self._tests[0])

    def wanted(self, path: str) -> bool:
        """True when a file passes the include and exclude globs."""
        target = normalise(path, windows=self.windows)
        excludes, includes = self._tests
        for test in excludes:
            if test(target):
                return False
        return not includes or any(test(target) for test in includes)
