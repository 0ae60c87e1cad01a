"""Unit tests of the rule-set analysis that lets non-PE files skip the pe module."""

from __future__ import annotations

import pytest
import yara

from vsphere_av.engine.matcher import EXTERNAL_DEFAULTS
from vsphere_av.engine.partition import SENTINEL, gate_of, non_pe_source


def rules_in(text: str | None) -> set[str]:
    assert text is not None
    return {r.identifier for r in yara.compile(source=text, externals=EXTERNAL_DEFAULTS)}


def count(text: str) -> int:
    return sum(1 for _ in yara.compile(source=text, externals=EXTERNAL_DEFAULTS))


@pytest.mark.parametrize(("condition", "prefix"), [
    ("uint16(0) == 0x5a4d and $a", b"MZ"),
    ("( uint16(0) == 0x5A4D and filesize < 10KB and all of them )", b"MZ"),
    ("filesize < 1MB and uint32(0) == 0x464c457f", b"\x7fELF"),
    ("uint32be(0) == 0x7f454c46 and $a", b"\x7fELF"),
    ("uint16(0) == 0x5a4d or $a", b""),
    ("(uint16(0) == 0x5a4d and $a) or $b", b""),
    ("not uint16(0) == 0x5a4d and $a", b""),
    ("$a", b""),
])
def test_gate_of(condition: str, prefix: bytes) -> None:
    assert gate_of(condition) == prefix


def test_pe_only_conjunct_is_evaluated_by_yara() -> None:
    cond = 'pe.imphash() == "0123456789abcdef0123456789abcdef" and $a'
    assert gate_of(cond, cond) == b"MZ"
    negated = 'not pe.is_dll() and $a'      # YARA: not undefined is still false
    assert gate_of(negated, negated) == b"MZ"
    constant = 'pe.MACHINE_I386 == 0x14c and $a'   # true on any file: no gate
    assert gate_of(constant, constant) == b""


SOURCE = '''import "pe"
rule mz_only { strings: $a = "x1" condition: uint16(0) == 0x5a4d and $a }
rule plain { strings: $a = "x2" condition: $a and filesize < 10MB }
rule reads_pe { strings: $a = "x3" $b = "x4"
  condition: (pe.number_of_sections == 1 and $a) or all of them }
private rule helper { strings: $a = "x5" condition: $a }
rule uses_helper { condition: helper and filesize > 0 }
'''


def test_non_pe_source_drops_mz_rules_and_guards_pe_readers() -> None:
    text = non_pe_source(SOURCE, expected_rules=count(SOURCE))
    assert text is not None
    assert 'import "pe"' not in text
    assert rules_in(text) == {"plain", "helper", "uses_helper", f"{SENTINEL}reads_pe"}


@pytest.mark.parametrize("source", [
    'import "pe"\nrule r { strings: $a = "x" condition: not pe.is_dll() or $a }',
    'import "pe"\nrule r { condition: pe.number_of_sections == 0 or filesize > 10 }',
    'import "pe"\nrule a { strings: $a = "x" condition: $a and pe.is_dll() }\n'
    'rule b { condition: a or filesize < 5 }',
])
def test_non_pe_source_gives_up_when_unsure(source: str) -> None:
    assert non_pe_source(source, expected_rules=count(source)) is None


def test_non_pe_source_keeps_files_without_pe() -> None:
    source = ('import "math"\nglobal rule g { condition: filesize < 1MB }\n'
              'rule r { condition: true }')
    text = non_pe_source(source, expected_rules=count(source))
    assert rules_in(text) == {"g", "r"}
