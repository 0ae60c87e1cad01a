"""Matching one buffer or file against one compiled signature version (YARA + hash list).

Called by ``engine.Session`` (and the scan-files worker processes); calls yara-python only.
Knows nothing about streams, archives or caches: it gets bytes (or a spooled file path), the
external variables and a SHA-256, and returns raw hits.

External variables are the ones the Loki / THOR scanners define, so public rule sets such as
signature-base compile and behave as their authors expect:

    filename   base name of the file ("bash.log")
    filepath   directory holding it ("/var/log"), as the rules compare it that way
    extension  lower-case extension with its dot (".exe"), "" when none
    filetype   short type name from the file's first bytes ("EXE", "ELF", "ZIP", ...)
    owner      owner's user name ("" when unknown)
"""

from __future__ import annotations

import ntpath
import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yara

from vsphere_av.engine.partition import SENTINEL

EXTERNAL_NAMES: tuple[str, ...] = ("filename", "filepath", "extension", "filetype", "owner")
EXTERNAL_DEFAULTS: dict[str, str] = {name: "" for name in EXTERNAL_NAMES}
NAME_EXTERNALS: frozenset[str] = frozenset({"filename", "filepath", "extension"})
HEAD_SIZE = 64   # bytes of the file's start that decide its filetype

# Magic numbers -> the filetype names public rules compare against (first match wins).
_MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"MZ", "EXE"),
    (0, b"\x7fELF", "ELF"),
    (0, b"\xfe\xed\xfa\xce", "MACH-O"),
    (0, b"\xfe\xed\xfa\xcf", "MACH-O"),
    (0, b"\xce\xfa\xed\xfe", "MACH-O"),
    (0, b"\xcf\xfa\xed\xfe", "MACH-O"),
    (0, b"\xca\xfe\xba\xbe", "MACH-O"),
    (0, b"MDMP", "MDMP"),
    (0, b"PMDM", "LSASS Dump File"),
    (0, b"PK\x03\x04", "ZIP"),
    (0, b"PK\x05\x06", "ZIP"),
    (0, b"Rar!\x1a\x07", "RAR"),
    (0, b"7z\xbc\xaf\x27\x1c", "7Z"),
    (0, b"\x1f\x8b", "GZIP"),
    (0, b"BZh", "BZIP2"),
    (0, b"\xfd7zXZ\x00", "XZ"),
    (0, b"%PDF", "PDF"),
    (0, b"{\\rtf", "RTF"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "OLE"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"dex\n", "DEX"),
    (0, b"<?php", "PHP"),
    (0, b"<?PHP", "PHP"),
    (0, b"<%@", "ASP"),
    (0, b"#!/usr/bin/python", "Python"),
    (0, b"#!/usr/bin/env python", "Python"),
    (0, b"#!/bin/sh", "SH"),
    (0, b"#!/bin/bash", "SH"),
    (0, b"#!/usr/bin/env bash", "SH"),
    (0, b"@echo off", "BATCH"),
    (0, b"@ECHO OFF", "BATCH"),
    (257, b"ustar", "TAR"),
)
# Script types recognised by extension when the content has no magic number.
_EXTENSION_TYPES: dict[str, str] = {
    ".vbs": "VBS", ".vbe": "VBS", ".jsp": "JSP", ".jspx": "JSP", ".asp": "ASP",
    ".aspx": "ASP", ".php": "PHP", ".py": "Python", ".bat": "BATCH", ".cmd": "BATCH",
    ".ps1": "PS1",
}
_HEAD_NEEDED = max(offset + len(magic) for offset, magic, _ in _MAGICS)


def file_type(head: bytes, *, extension: str = "") -> str:
    """The filetype external for a file starting with ``head`` ("" when unknown)."""
    for offset, magic, name in _MAGICS:
        if head[offset:offset + len(magic)] == magic:
            return name
    return _EXTENSION_TYPES.get(extension, "")


def split_name(path: str, name: str | None = None) -> tuple[str, str, str]:
    """(filename, filepath, extension) for a POSIX or Windows path (filepath is the directory)."""
    windows = "\\" in path or (path[1:2] == ":" and path[:1].isalpha())
    directory, base = (ntpath if windows else posixpath).split(path)
    if name is not None:
        base = name
    extension = os.path.splitext(base)[1].lower()
    return base, directory, extension


def utf8_name(text: str) -> str:
    """A file name as YARA (and JSON) can take it: valid UTF-8.

    Names that are not UTF-8 come from Python with surrogate escapes (as ``os.fsdecode``
    gives them); each such byte is kept as the text ``\\xNN``.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text


def externals_for(*, path: str, name: str | None, head: bytes, owner: str) -> dict[str, str]:
    """The five external variables for one file."""
    filename, filepath, extension = split_name(path, name)
    return {"filename": utf8_name(filename), "filepath": utf8_name(filepath),
            "extension": utf8_name(extension),
            "filetype": file_type(head, extension=extension), "owner": utf8_name(owner)}


_COMMENT_OR_STRING = re.compile(
    r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|(?:matches|=)\s*/(?:\\.|[^/\\\n])+/[is]*', re.S)


def externals_used(source: str) -> frozenset[str]:
    """Which external variables a rule source reads (conservative: comments and strings ignored)."""
    stripped = _COMMENT_OR_STRING.sub(" ", source)
    return frozenset(name for name in EXTERNAL_NAMES if re.search(rf"\b{name}\b", stripped))


@dataclass(frozen=True)
class Hit:
    """One raw hit before it becomes a Detection (member path is added by the caller)."""

    threat: str
    source: str   # "yara" | "hash"
    rule: str


def _threat_of(match: Any) -> str:
    meta = match.meta or {}
    for key in ("threat", "malware_name", "malware"):
        value = meta.get(key)
        if isinstance(value, str) and value:
            return value
    return str(match.rule)


class Matcher:
    """YARA rules plus a SHA-256 list of one signature version."""

    def __init__(self, *, rules: yara.Rules, hashes: Mapping[str, str],
                 hash_list_names: Mapping[str, str] | None = None, timeout: int = 60,
                 non_pe: yara.Rules | None = None) -> None:
        self._rules = rules
        self._non_pe = non_pe
        self._hashes = hashes
        self._hash_list_names = hash_list_names or {}
        self._timeout = timeout

    def match_hash(self, sha256: str) -> list[Hit]:
        """Hash-list hit for this SHA-256 (empty list when not listed)."""
        threat = self._hashes.get(sha256)
        if threat is None:
            return []
        return [Hit(threat=threat, source="hash", rule=self._hash_list_names.get(sha256, "sha256"))]

    def _match(self, head: bytes, externals: Mapping[str, str], **target: Any) -> list[Hit]:
        ext = dict(externals)
        if self._non_pe is not None and not head.startswith(b"MZ"):
            # The pe-free set gives the same verdicts on such files, unless a sentinel says
            # that a rule reading pe has its strings here: then all rules decide.
            matches = self._non_pe.match(externals=ext, timeout=self._timeout, **target)
            if not any(m.rule.startswith(SENTINEL) for m in matches):
                return [Hit(threat=_threat_of(m), source="yara", rule=f"{m.namespace}:{m.rule}")
                        for m in matches]
        matches = self._rules.match(externals=ext, timeout=self._timeout, **target)
        return [Hit(threat=_threat_of(m), source="yara", rule=f"{m.namespace}:{m.rule}")
                for m in matches]

    def match_data(self, data: bytes | memoryview, externals: Mapping[str, str]) -> list[Hit]:
        """YARA hits for an in-memory buffer."""
        return self._match(bytes(data[:2]), externals, data=data)

    def match_file(self, path: str, externals: Mapping[str, str], *, head: bytes) -> list[Hit]:
        """YARA hits for a file on disk (libyara maps it; nothing is read into Python)."""
        return self._match(head, externals, filepath=path)
