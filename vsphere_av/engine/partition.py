"""A pe-free rule set for files that are not PE files (a pre-filter with the same verdicts).

Called by ``signatures.SignatureStore.import_bundle``; calls yara-python only to evaluate
pe-only expressions on non-PE data (see ``_false_without_pe``).

Importing the pe module costs YARA about 0.2 ms on *every* scanned file (it builds the
module's object tree each time), more than scanning a typical small file. Yet on a file
that does not start with "MZ" the pe module finds nothing, and most public rules that
read it are gated anyway (``uint16(0) == 0x5a4d and ...``). So for each rule file we build
a second text for files not starting with "MZ":

* rules that can only match "MZ" files are left out;
* rules that do not read pe are kept as they are (``import "pe"`` removed);
* a rule that reads pe but is false whenever none of its strings match (proved on the
  condition's and/or structure) is replaced by a sentinel rule with its strings and
  ``any of them``: when a sentinel matches, the file is scanned again with the whole set;
* anything else (a negation around pe, rule references into pe rules, global rules we
  cannot analyse) makes the analysis give up: that bundle is scanned with the whole set.

The matcher uses this set only for non-"MZ" files, so the verdicts equal the whole set's
(an integration test checks it on thousands of samples built from signature-base).
"""

from __future__ import annotations

import re

import yara

# Comments, text strings and regular expressions: masked before any structural analysis.
_MASKED = re.compile(
    r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|(?<=matches)\s*/(?:\\.|[^/\\\n])+/[is]*'
    r'|(?<==)\s*/(?:\\.|[^/\\\n])+/[is]*', re.S)
_RULE_HEAD = re.compile(r"\b((?:(?:private|global)\s+)*)rule\s+([A-Za-z_]\w*)[^{]*\{")
_IMPORT = re.compile(r"^[ \t]*import\b[^\n]*", re.M)
_TOKEN = re.compile(r"\(|\)|\band\b|\bor\b|[^()\s]+")
_GATE = re.compile(r"^uint(8|16|32)(be)?\(0\)==(0x[0-9a-f]+|\d+)$")
_IDENT = re.compile(r"(?<![\w$#@!.])[A-Za-z_]\w*")   # not $str, #str, @str, !str, mod.field
_RULE_WILDCARD = re.compile(r"(?<![\w$#@!.])[A-Za-z_]\w*\*")


def _mask(text: str) -> str:
    """Same length and line structure, with comments, strings and regexes blanked."""
    return _MASKED.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def _block_end(masked: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(masked)):
        c = masked[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _closing(tokens: list[re.Match[str]], at: int) -> int:
    depth = 0
    for i in range(at, len(tokens)):
        if tokens[i].group(0) == "(":
            depth += 1
        elif tokens[i].group(0) == ")":
            depth -= 1
            if depth == 0:
                return i
    return -1


# A conjunct that reads nothing but the pe module (and constants) has one and the same value
# on every file not starting with "MZ": the pe module parses nothing there. YARA itself
# evaluates it once on such data; false means the rule cannot match those files.
_NOT_PE_ONLY = re.compile(
    r"[$#@]|!(?!=)|\bthem\b|\bfilesize\b|\bentrypoint\b|\bu?int(?:8|16|32)(?:be)?\s*\("
    r"|\b(?:math|hash|elf|dotnet|cuckoo|magic|time|console|string|lnk|macho|dex|androguard)\."
    r"|\b(?:filename|filepath|extension|filetype|owner)\b")
_PE_VERDICTS: dict[str, bool] = {}


def _false_without_pe(conjunct: str) -> bool:
    """True when this pe-only expression is false (or undefined) on any non-"MZ" file."""
    verdict = _PE_VERDICTS.get(conjunct)
    if verdict is None:
        try:
            rules = yara.compile(source=f'import "pe"\nrule probe {{ condition: {conjunct}\n}}')
            samples = (b"", b"\x7fELF\x02\x01\x01" + b"\x00" * 64, b"PE\x00\x00")
            verdict = not any(rules.match(data=data) for data in samples)
        except yara.Error:
            verdict = False
        _PE_VERDICTS[conjunct] = verdict
    return verdict


def gate_of(condition: str, original: str | None = None, *,
            rule_names: frozenset[str] = frozenset()) -> bytes:
    """The byte prefix a condition requires at offset 0 (b"" when none is implied).

    ``condition`` is masked (comments, strings, regexes blanked); ``original`` is the same
    text unmasked, used to evaluate pe-only conjuncts with YARA.
    """
    tokens = list(_TOKEN.finditer(condition))
    while tokens and tokens[0].group(0) == "(" and _closing(tokens, 0) == len(tokens) - 1:
        tokens = tokens[1:-1]          # "( a and b )" is "a and b"
    depth = 0
    spans: list[tuple[int, int]] = []
    start: int | None = None
    end = 0
    for token in tokens:
        text = token.group(0)
        if text == "(":
            depth += 1
        elif text == ")":
            depth -= 1
        if depth == 0 and text == "or":
            return b""
        if depth == 0 and text == "and":
            if start is not None:
                spans.append((start, end))
            start = None
            continue
        if start is None:
            start = token.start()
        end = token.end()
    if start is not None:
        spans.append((start, end))
    best = b""
    for lo, hi in spans:
        part = re.sub(r"\s+", "", condition[lo:hi]).lower()
        m = _GATE.match(part)
        if m:
            width = int(m.group(1)) // 8
            value = int(m.group(3), 0)
            if value < 1 << (8 * width):
                prefix = value.to_bytes(width, "big" if m.group(2) else "little")
                if len(prefix) > len(best):
                    best = prefix
            continue
        if original is not None and not best and "pe." in part and \
                not _NOT_PE_ONLY.search(condition[lo:hi]) and \
                not (rule_names & set(_IDENT.findall(condition[lo:hi]))) and \
                _false_without_pe(original[lo:hi]):
            best = b"MZ"
    return best


SENTINEL = "vsphere_av_sentinel_"   # rules of the no-pe set that say "rescan with all rules"
_STRING_ATOMS = (
    re.compile(r"^\$\w*(\s+(at|in)\s+.*)?$", re.S),
    re.compile(r"^(any|all|[1-9]\d*)\s+of\s+(them|\(\s*\$[^()]*\))(\s+(at|in)\s+.*)?$", re.S),
    re.compile(r"^#\w*\s*(>\s*\d+|>=\s*[1-9]\d*)$"),
)


class _Unknown(Exception):
    """The condition has a shape the analysis does not handle: be conservative."""


def _false_without_strings(condition: str, original: str, rule_names: frozenset[str]) -> bool:
    """True when the condition is false on any non-"MZ" file where none of its strings match.

    Recursive over and / or / parentheses; atoms that qualify: string references ($a,
    $a at/in, N of them, #a > N), an "MZ" gate, and pe-only expressions YARA evaluates false
    without a PE. Anything else (``not``, arithmetic on groups, ...) does not qualify.
    """
    tokens = list(_TOKEN.finditer(condition))
    pos = 0

    def atom_text(lo: int, hi: int) -> tuple[str, str]:
        start, end = tokens[lo].start(), tokens[hi - 1].end()
        return condition[start:end], original[start:end]

    def atom_qualifies(lo: int, hi: int) -> bool:
        masked, text = atom_text(lo, hi)
        flat = re.sub(r"\s+", " ", masked.strip())
        if any(p.match(flat) for p in _STRING_ATOMS):
            return True
        gate = _GATE.match(flat.replace(" ", "").lower())
        if gate:
            width = int(gate.group(1)) // 8
            value = int(gate.group(3), 0)
            if value >= 1 << (8 * width):
                return False
            return value.to_bytes(width, "big" if gate.group(2) else "little").startswith(b"MZ")
        return ("pe." in masked and not _NOT_PE_ONLY.search(masked)
                and not (rule_names & set(_IDENT.findall(masked)))
                and _false_without_pe(text))

    def parse_or() -> bool:
        nonlocal pos
        result = parse_and()
        while pos < len(tokens) and tokens[pos].group(0) == "or":
            pos += 1
            right = parse_and()
            result = result and right
        return result

    def parse_and() -> bool:
        nonlocal pos
        result = parse_primary()
        while pos < len(tokens) and tokens[pos].group(0) == "and":
            pos += 1
            right = parse_primary()
            result = result or right
        return result

    def parse_primary() -> bool:
        nonlocal pos
        if pos >= len(tokens):
            raise _Unknown
        first = tokens[pos].group(0)
        if first == "not":
            pos += 1
            parse_primary()     # consumed; a negation never qualifies
            return False
        if first == "(":
            close = _closing(tokens, pos)
            if close < 0:
                raise _Unknown
            after = tokens[close + 1].group(0) if close + 1 < len(tokens) else ")"
            if after in ("and", "or", ")"):
                pos += 1
                inner = parse_or()
                if pos != close:
                    raise _Unknown
                pos = close + 1
                return inner
        # An atom: tokens up to the next top-level and / or / closing parenthesis.
        lo, depth = pos, 0
        while pos < len(tokens):
            text = tokens[pos].group(0)
            if depth == 0 and text in ("and", "or", ")"):
                break
            if text == "(":
                depth += 1
            elif text == ")":
                depth -= 1
            pos += 1
        if pos == lo:
            raise _Unknown
        return atom_qualifies(lo, pos)

    try:
        result = parse_or()
    except (_Unknown, IndexError):
        return False
    return result and pos == len(tokens)


def non_pe_source(source: str, *, expected_rules: int) -> str | None:
    """This file's rules for files not starting with "MZ", without the pe module.

    Rules that need "MZ" are left out. A rule that reads pe but is false whenever none of
    its strings match is replaced by a sentinel rule holding just its strings (a file where
    a sentinel matches is scanned again with all rules). None when that cannot be done.
    """
    masked = _mask(source)
    uses_pe = re.search(r"\bpe\.", masked) is not None
    no_pe_imports = re.sub(r'^[ \t]*import\s+"pe"[ \t]*$', "", source, flags=re.M)
    if re.search(r"\bglobal\b", masked) or re.search(r"\binclude\b", masked):
        return None if uses_pe else no_pe_imports
    heads = list(_RULE_HEAD.finditer(masked))
    if len(heads) != expected_rules or not heads:
        return None if uses_pe else no_pe_imports
    imports = "\n".join(source[m.start():m.end()].strip() for m in _IMPORT.finditer(masked)
                        if '"pe"' not in source[m.start():m.end()])
    names: list[str] = []
    spans: list[tuple[int, int]] = []
    conditions: list[str] = []
    originals: list[str] = []
    strings: list[str] = []
    for head in heads:
        end = _block_end(masked, head.end() - 1)
        if end < 0:
            return None if uses_pe else no_pe_imports
        body = masked[head.end():end]
        cond_at = re.search(r"\bcondition\s*:", body)
        if cond_at is None:
            return None if uses_pe else no_pe_imports
        condition = body[cond_at.end():]
        if _RULE_WILDCARD.search(condition):     # rule-set wildcard such as (Foo_*)
            return None if uses_pe else no_pe_imports
        cond_start = head.end() + cond_at.end()
        str_at = re.search(r"\bstrings\s*:", body[:cond_at.start()])
        strings.append(source[head.end() + str_at.end():head.end() + cond_at.start()]
                       if str_at else "")
        originals.append(source[cond_start:end])
        names.append(head.group(2))
        spans.append((head.start(), end + 1))
        conditions.append(condition)

    rule_names = frozenset(names)
    mz_only = [gate_of(c, o, rule_names=rule_names).startswith(b"MZ")
               for c, o in zip(conditions, originals, strict=True)]
    # Rules referring to each other are one unit.
    index = {name: i for i, name in enumerate(names)}
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, condition in enumerate(conditions):
        for ident in set(_IDENT.findall(condition)):
            j = index.get(ident)
            if j is not None and j != i:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(names)):
        groups.setdefault(find(i), []).append(i)
    keep: list[int] = []
    sentinels: list[str] = []
    for members in groups.values():
        if all(mz_only[i] for i in members):
            continue                                  # cannot match a non-"MZ" file
        if not any(re.search(r"\bpe\.", conditions[i]) for i in members):
            keep.extend(members)
            continue
        if len(members) != 1:
            return None
        i = members[0]
        if not _false_without_strings(conditions[i], originals[i], rule_names):
            return None
        if strings[i].strip():
            sentinels.append(f"rule {SENTINEL}{names[i]} {{\n  strings:{strings[i]}\n"
                             f"  condition:\n    any of them\n}}")
    keep.sort()
    parts = [source[spans[i][0]:spans[i][1]] for i in keep] + sentinels
    return f"{imports}\n\n" + "\n\n".join(parts) + "\n"
