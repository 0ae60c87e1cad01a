"""The signature-base tests skip on a fresh clone without ../shared and fail under CI=true.

Runs pytest on those tests in a child process with VSPHERE_AV_SIGNATURE_BASE pointing at a
directory that does not exist, so the outcome is the fixture's decision alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).with_name("test_engine_signatures.py")


def run(tmp_path: Path, *, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["VSPHERE_AV_SIGNATURE_BASE"] = str(tmp_path / "absent")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
         f"{TESTS}::test_signature_base_compiles_whole"],
        env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(("ci", "code", "summary"), [
    (None, 0, "1 skipped"),
    ("false", 0, "1 skipped"),
    ("true", 1, "1 error"),
])
def test_missing_rule_set(tmp_path: Path, ci: str | None, code: int, summary: str) -> None:
    done = run(tmp_path, ci=ci)
    assert done.returncode == code, done.stdout + done.stderr
    assert summary in done.stdout
    assert "rule set missing" in done.stdout
