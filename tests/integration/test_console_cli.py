"""``vsphere-av api token create|list|revoke`` and ``vsphere-av report`` (issue 14), run as
the real command in a subprocess over a real state directory (tokens) and a simulator fleet
scanned by the real engine (report)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SimulatorFactory, env_for
from controller_support import EICAR

from vsphere_av import config
from vsphere_av.api.tokens import TokenStore, token_hash
from vsphere_av.app import App
from vsphere_av.store.audit import AuditLog

VM0 = "DC0_C0_RP0_VM0"


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env}
    full.pop("VSPHERE_AV_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "vsphere_av", *args], env=full,
                          capture_output=True, text=True, timeout=120, check=False)


def test_tokens_are_printed_once_stored_as_hashes_listed_and_revoked(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {"VSPHERE_AV_STATE_DIR": str(state)}
    created = run(env, "api", "token", "create", "--role", "auditor", "--name", "grafana")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("vsav_")
    assert len(token) > 40
    assert "shown only now" in created.stderr
    assert token not in created.stderr
    # only the hash is kept, anywhere in the state directory
    for path in state.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    with TokenStore(state_dir=state) as store:
        assert store.authenticate(token) is not None
        assert store.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    stored = b"".join(p.read_bytes() for p in state.glob("api-tokens.sqlite*") if p.is_file())
    assert token_hash(token).encode() in stored

    listed = run(env, "api", "token", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)["tokens"]
    assert row["name"] == "grafana"
    assert row["role"] == "auditor"
    assert row["revoked"] is None
    assert token not in listed.stdout

    twice = run(env, "api", "token", "create", "--role", "auditor", "--name", "grafana")
    assert twice.returncode == 2
    assert "exists" in twice.stderr
    bad_role = run(env, "api", "token", "create", "--role", "root", "--name", "x")
    assert bad_role.returncode == 2
    bad_name = run(env, "api", "token", "create", "--role", "auditor", "--name", "a b")
    assert bad_name.returncode == 2

    revoked = run(env, "api", "token", "revoke", "grafana")
    assert revoked.returncode == 0, revoked.stderr
    with TokenStore(state_dir=state) as store:
        assert store.authenticate(token) is None
    unknown = run(env, "api", "token", "revoke", "nobody")
    assert unknown.returncode == 2
    assert "no API token named 'nobody'" in unknown.stderr
    with AuditLog.open(state) as log:
        entries = [(e.action, dict(e.details)) for e in log.entries()]
    assert entries == [("api.token.create", {"name": "grafana", "role": "auditor"}),
                       ("api.token.revoke", {"name": "grafana", "role": "auditor"})]


@pytest.fixture
def fleet(vcsim_factory: SimulatorFactory, tmp_path: Path) -> tuple[dict[str, str], Path]:
    sim = vcsim_factory()
    target = sim.guest_root / VM0 / "srv" / "upload" / "eicar.com"
    target.parent.mkdir(parents=True)
    target.write_bytes(EICAR)
    state = tmp_path / "state"
    env = env_for(sim, state)
    with App(config.load(env=env)) as app:
        assert app.scan(all_vms=True).exit_code() == 1
    return env, state


def test_report_in_every_format(fleet: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, state = fleet
    out = run(env, "report", "--format", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["totals"]["detections"] == 1
    assert doc["totals"]["infected"] == 1
    vm0 = next(v for v in doc["vms"] if v["name"] == VM0)
    assert vm0["state"] == "infected"
    assert vm0["actions"] == {"quarantined": 1}
    assert vm0["detections"][0]["path"] == "/srv/upload/eicar.com"
    assert doc["audit"]["intact"] is True
    with AuditLog.open(state) as log:
        seq, digest = log.head()
    assert doc["audit"]["head"] == f"{seq}:{digest}"
    assert sum(d["detections"] for d in doc["per_day"]) == 1

    csv_out = run(env, "report", "--format", "csv")
    rows = list(csv.reader(io.StringIO(csv_out.stdout)))
    assert rows[0][:4] == ["vm", "moref", "host", "state"]
    (vm0_row,) = [r for r in rows if r and r[0] == VM0]
    assert vm0_row[3] == "infected"
    assert vm0_row[6] == "1"
    assert ["audit chain head", f"{seq}:{digest}", "intact"] in rows

    html_file = tmp_path / "report.html"
    assert run(env, "report", "--since", "2020-01-01", "--format", "html", "-o",
               str(html_file)).returncode == 0
    html = html_file.read_text()
    assert "<svg" in html
    assert "/srv/upload/eicar.com" in html
    assert "https://" not in html
    assert "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")

    pdf_file = tmp_path / "report.pdf"
    pdf = run(env, "report", "--format", "pdf", "-o", str(pdf_file))
    assert pdf.returncode == 0, pdf.stderr
    assert pdf_file.read_bytes().startswith(b"%PDF-")
    assert pdf_file.stat().st_size > 5000
    again = run(env, "report", "--format", "pdf", "-o", str(pdf_file))
    assert again.returncode == 2                         # never over an existing file
    inside = run(env, "report", "--format", "csv", "-o", str(state / "r.csv"))
    assert inside.returncode == 2                        # never into the state directory
    future = run(env, "report", "--since", "2999-01-01")
    assert future.returncode == 2
    assert "future" in future.stderr
    garbage = run(env, "report", "--since", "last week")
    assert garbage.returncode == 2
