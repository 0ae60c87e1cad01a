"""Unit tests of the engine's pure helpers: externals, filetype, rule analysis, hash lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsphere_av.engine import archives
from vsphere_av.engine.matcher import externals_for, externals_used, file_type, split_name
from vsphere_av.engine.signatures import _parse_hash_list


@pytest.mark.parametrize(("path", "name", "expected"), [
    ("/var/log/bash.log", None, ("bash.log", "/var/log", ".log")),
    ("/usr/bin/ls", None, ("ls", "/usr/bin", "")),
    ("C:\\Windows\\System32\\CMD.EXE", None, ("CMD.EXE", "C:\\Windows\\System32", ".exe")),
    ("C:/Users/x/a.Ps1", None, ("a.Ps1", "C:/Users/x", ".ps1")),
    ("/tmp/download.part", "real.vbs", ("real.vbs", "/tmp", ".vbs")),
    ("/home/u/.bashrc", None, (".bashrc", "/home/u", "")),
    ("/a/b.tar.gz", None, ("b.tar.gz", "/a", ".gz")),
])
def test_split_name_matches_loki_semantics(path: str, name: str | None,
                                           expected: tuple[str, str, str]) -> None:
    assert split_name(path, name) == expected


@pytest.mark.parametrize(("head", "extension", "expected"), [
    (b"MZ\x90\x00", "", "EXE"),
    (b"\x7fELF\x02\x01", "", "ELF"),
    (b"\xcf\xfa\xed\xfe", "", "MACH-O"),
    (b"PK\x03\x04", "", "ZIP"),
    (b"%PDF-1.7", "", "PDF"),
    (b"{\\rtf1", "", "RTF"),
    (b"MDMP\x93\xa7", "", "MDMP"),
    (b"GIF89a", "", "GIF"),
    (b"<?php echo 1;", "", "PHP"),
    (b"Dim x", ".vbs", "VBS"),
    (b"<%@ Page", "", "ASP"),
    (b"plain text", ".txt", ""),
    (b"\x00" * 257 + b"ustar\x0000", "", "TAR"),
])
def test_file_type(head: bytes, extension: str, expected: str) -> None:
    assert file_type(head, extension=extension) == expected


def test_externals_for_sets_all_five() -> None:
    ext = externals_for(path="/srv/www/shell.php", name=None, head=b"<?php", owner="www-data")
    assert ext == {"filename": "shell.php", "filepath": "/srv/www", "extension": ".php",
                   "filetype": "PHP", "owner": "www-data"}


@pytest.mark.parametrize(("source", "expected"), [
    ('rule a { condition: filename == "x" }', {"filename"}),
    ('rule a { condition: filepath contains "/etc" and extension == ".so" }',
     {"filepath", "extension"}),
    ('rule a { condition: owner == "root" and filetype == "ELF" }', {"owner", "filetype"}),
    ('rule a { strings: $a = "filename owner" condition: $a }', set()),
    ('// filename\nrule a { condition: true } /* owner */', set()),
    ('rule a { strings: $r = /filepath/ condition: $r }', set()),
    ('rule my_filename_rule { condition: true }', set()),
])
def test_externals_used(source: str, expected: set[str]) -> None:
    assert externals_used(source) == frozenset(expected)


def test_hash_list_parsing(tmp_path: Path) -> None:
    good = tmp_path / "good.sha256"
    sha = "ab" * 32
    good.write_text(f"# comment\n\n{sha.upper()}  Trojan.Test  \n{'cd' * 32} Other Name\n")
    into: dict[str, tuple[str, str]] = {}
    assert _parse_hash_list(good, "good.sha256", into) is None
    assert into[sha] == ("Trojan.Test", "good.sha256")
    assert into["cd" * 32][0] == "Other Name"

    bad = tmp_path / "bad.sha256"
    bad.write_text(f"{sha} ok\nnot-a-hash Threat\n")
    problem = _parse_hash_list(bad, "lists/bad.sha256", {})
    assert problem is not None
    assert problem.startswith("lists/bad.sha256 line 2:")


@pytest.mark.parametrize(("head", "kind"), [
    (b"PK\x03\x04rest", "zip"),
    (b"\x1f\x8b\x08\x00", "gzip"),
    (b"BZh91AY", "bz2"),
    (b"\xfd7zXZ\x00\x00", "xz"),
    (b"a" * 257 + b"ustar  ", "tar"),
    (b"MZ\x90", ""),
    (b"BZhx", ""),
])
def test_archive_kind(head: bytes, kind: str) -> None:
    assert archives.kind_of(head) == kind
