"""Pure logic of guest scans: path filters, remediation order, resulting states, exit codes."""

from __future__ import annotations

import pytest

from vsphere_av.app import ScanReport
from vsphere_av.config import ScanPolicy
from vsphere_av.scan import Filters, ScanResult, matches, protection_after, remediation_plan


@pytest.mark.parametrize(("pattern", "path", "windows", "expected"), [
    ("/proc", "/proc", False, True),
    ("/proc", "/proc/1/maps", False, True),
    ("/proc", "/process/x", False, False),
    ("/proc/", "/proc/1", False, True),
    ("/", "/etc/passwd", False, True),
    ("*.iso", "/srv/images/debian.iso", False, True),
    ("*.iso", "/srv/images/debian.iso.txt", False, False),
    ("*.ISO", "/srv/a.iso", False, False),                       # Linux is case-sensitive
    ("/home/*/cache", "/home/bob/cache", False, True),
    ("/home/*/cache", "/home/bob/cache2", False, False),
    ("*/pagefile.sys", "C:\\pagefile.sys", True, True),
    ("*/pagefile.sys", "C:\\PAGEFILE.SYS", True, True),
    ("*/pagefile.sys", "C:\\Users\\pagefile.sys.bak", True, False),
    ("C:/$Recycle.Bin", "c:\\$RECYCLE.BIN\\S-1\\x.exe", True, True),
    ("C:\\Windows\\WinSxS", "C:\\Windows\\winsxs\\a.dll", True, True),
    ("C:\\Windows\\WinSxS", "C:\\Windows\\System32\\a.dll", True, False),
    ("C:\\", "C:\\anything", True, True),
    ("*.tmp", "C:\\Temp\\X.TMP", True, True),
])
def test_matches(pattern: str, path: str, windows: bool, expected: bool) -> None:
    assert matches(pattern, path, windows=windows) is expected


@pytest.mark.parametrize(("directory", "windows", "pruned"), [
    ("/proc", False, True), ("/sys", False, True), ("/dev", False, True), ("/run", False, True),
    ("/var/run", False, True), ("/etc", False, False), ("/home/proc", False, False),
    ("C:\\System Volume Information", True, True), ("C:\\$Recycle.Bin", True, True),
    ("C:\\Users", True, False),
])
def test_default_exclusions_prune_pseudo_and_volatile_dirs(directory: str, windows: bool,
                                                           pruned: bool) -> None:
    filters = Filters.from_policy(ScanPolicy(), windows=windows)
    assert filters.prune(directory) is pruned


@pytest.mark.parametrize(("path", "windows", "wanted"), [
    ("C:\\pagefile.sys", True, False), ("C:\\hiberfil.sys", True, False),
    ("C:\\swapfile.sys", True, False), ("C:\\Users\\a.exe", True, True),
    ("/etc/passwd", False, True),
])
def test_default_exclusions_skip_swap_files(path: str, windows: bool, wanted: bool) -> None:
    assert Filters.from_policy(ScanPolicy(), windows=windows).wanted(path) is wanted


def test_include_and_exclude_globs_combine() -> None:
    policy = ScanPolicy(include=("*.exe", "*.dll", "/opt/app"), exclude=("/opt/app/cache",))
    f = Filters.from_policy(policy, windows=False)
    assert f.wanted("/home/a/setup.exe")
    assert f.wanted("/opt/app/bin/run")
    assert not f.wanted("/home/a/notes.txt")
    assert not f.wanted("/opt/app/cache/x.exe")
    assert f.prune("/opt/app/cache")
    assert not f.prune("/opt/app")


@pytest.mark.parametrize(("policy_max", "engine_max", "expected"), [
    (100, None, 100), (100, 50, 50), (50, 100, 50)])
def test_size_limit_is_the_smaller_of_policy_and_engine(policy_max: int, engine_max: int | None,
                                                         expected: int) -> None:
    f = Filters.from_policy(ScanPolicy(max_file_size=policy_max), windows=False,
                            engine_max=engine_max)
    assert f.max_file_size == expected


@pytest.mark.parametrize(("action", "fallback", "plan"), [
    ("quarantine", "delete", ("quarantine", "delete")),
    ("quarantine", "", ("quarantine",)),
    ("quarantine", "quarantine", ("quarantine",)),
    ("delete", "report", ("delete", "report")),
    ("report", "delete", ("report",)),          # reporting cannot fail: no second action
])
def test_remediation_plan(action: str, fallback: str, plan: tuple[str, ...]) -> None:
    assert remediation_plan(action, fallback) == plan


@pytest.mark.parametrize(("status", "previous", "state"), [
    ("clean", None, "protected"), ("clean", "infected", "protected"),
    ("infected", "protected", "infected"),
    ("unreachable", None, "unreachable"), ("unreachable", "protected", "unreachable"),
    ("unreachable", "infected", "infected"),      # an unreachable infected VM stays infected
    ("skipped", None, "unprotected"), ("skipped", "unreachable", "unprotected"),
    ("skipped", "protected", None), ("skipped", "infected", None),
    ("error", "protected", "unreachable"), ("error", "infected", None),
    # not every byte checked: never protected, and an infected VM stays infected
    ("incomplete", None, "unprotected"), ("incomplete", "protected", "unprotected"),
    ("incomplete", "infected", "infected"),
])
def test_protection_after(status: str, previous: str | None, state: str | None) -> None:
    assert protection_after(status, previous=previous) == state


def _r(status: str) -> ScanResult:
    return ScanResult(vm="vm", moref="vm-1", host="h", status=status)


@pytest.mark.parametrize(("statuses", "code"), [
    (["clean"], 0), (["clean", "skipped"], 0), ([], 0),
    (["clean", "infected"], 1), (["infected", "unreachable"], 1),
    (["clean", "unreachable"], 2), (["error"], 2),
])
def test_exit_codes(statuses: list[str], code: int) -> None:
    report = ScanReport(results=[_r(s) for s in statuses], signature_version=1, duration=0.0)
    assert report.exit_code() == code


def test_report_json_shape() -> None:
    report = ScanReport(results=[_r("clean")], signature_version=3, duration=1.5)
    doc = report.as_dict()
    assert set(doc) == {"vms", "summary", "signature_version", "peak_per_host"}
    assert {"scanned", "unchanged", "skipped", "errors", "detections", "status",
            "reason"} <= set(doc["vms"][0])
    assert doc["summary"]["vms"] == 1
    assert doc["summary"]["clean"] == 1
