"""``vsphere-av appliances reconcile`` / ``list`` and the status overlay, against the simulator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from conftest import SimulatorFactory, all_vms, connect, env_for, wait_task
from pyVmomi import vim

from vsphere_av.cli import main
from vsphere_av.lab import simulator


def _env(sim: simulator.Simulator, tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "config.toml"
    config.write_text('[appliances]\nenabled = true\naddresses = ["127.0.0.61-127.0.0.70"]\n')
    return env_for(sim, tmp_path / "state", VSPHERE_AV_CONFIG=str(config))


def _run(env: dict[str, str], *args: str) -> Any:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result


def test_reconcile_cli_dry_run_then_apply_then_nothing(vcsim_factory: SimulatorFactory,
                                                       tmp_path: Path) -> None:
    sim = vcsim_factory(hosts=3, vms=1)
    env = _env(sim, tmp_path)
    dry = _run(env, "appliances", "reconcile", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.output)
    assert len(plan["actions"]) == 9
    assert {(a["kind"], a["host"]) for a in plan["actions"]} == {
        (k, f"DC0_C0_H{i}") for k in ("deploy", "pin", "power_on") for i in range(3)}
    assert all(a["vm"].startswith("vsphere-av-appliance-DC0_C0_H") for a in plan["actions"])
    assert plan["dry_run"] is True

    si = connect(sim)
    names = {vm.name for vm in all_vms(si)}
    assert not any(n.startswith("vsphere-av-appliance") for n in names)   # dry run: untouched

    applied = _run(env, "appliances", "reconcile", "--json")
    assert applied.exit_code == 0, applied.output
    actions = json.loads(applied.output)["actions"]
    assert len(actions) == 9
    assert all(a["ok"] for a in actions)

    again = _run(env, "appliances", "reconcile", "--json")
    assert json.loads(again.output)["actions"] == []
    people = _run(env, "appliances", "reconcile")
    assert "nothing to do" in people.output

    listed = json.loads(_run(env, "appliances", "list", "--json").output)
    assert len(listed["appliances"]) == 3
    assert listed["down"] == {}
    assert all(a["address"].startswith("127.0.0.6") for a in listed["appliances"])


def test_status_shows_unprotected_while_the_appliance_is_down(vcsim_factory: SimulatorFactory,
                                                              tmp_path: Path) -> None:
    sim = vcsim_factory(hosts=2, vms=2)
    env = _env(sim, tmp_path)
    assert _run(env, "appliances", "reconcile").exit_code == 0
    si = connect(sim)
    content = si.RetrieveContent()
    host, other = content.rootFolder.childEntity[0].hostFolder.childEntity[0].host
    vm0, vm1 = sorted((vm for vm in content.rootFolder.childEntity[0].vmFolder.childEntity
                       if vm.name.startswith("DC0_C0_RP0_VM")), key=lambda v: v.name)
    wait_task(vm0.RelocateVM_Task(vim.vm.RelocateSpec(host=host)))     # one workload per host
    wait_task(vm1.RelocateVM_Task(vim.vm.RelocateSpec(host=other)))
    appliance = next(vm for vm in host.vm if vm.name.startswith("vsphere-av-appliance-"))
    workloads = {vm0.name}
    wait_task(appliance.PowerOffVM_Task())
    status = json.loads(_run(env, "status", "--json").output)
    rows = {r["name"]: r for r in status["vms"]}
    assert workloads
    for name in workloads:
        assert rows[name]["state"] == "unprotected"
        assert rows[name]["reason"] == "appliance down"
    assert rows[vm1.name]["reason"] != "appliance down"    # its host's appliance runs
    assert not [n for n in rows if n.startswith("vsphere-av-appliance-")]   # not workloads

    assert _run(env, "appliances", "reconcile").exit_code == 0     # powered on again
    rows = {r["name"]: r for r in json.loads(_run(env, "status", "--json").output)["vms"]}
    assert all(rows[n]["reason"] != "appliance down" for n in workloads)


def test_failed_deploy_exits_2_and_says_why(vcsim_factory: SimulatorFactory,
                                            tmp_path: Path) -> None:
    sim = vcsim_factory(hosts=1, vms=0)
    env = _env(sim, tmp_path)
    Path(env["VSPHERE_AV_CONFIG"]).write_text(
        '[appliances]\nenabled = true\nsource = "template"\ntemplate = "no-such-template"\n')
    result = _run(env, "appliances", "reconcile", "--json")
    assert result.exit_code == 2
    actions = json.loads(result.output)["actions"]
    assert actions[0]["kind"] == "deploy"
    assert actions[0]["ok"] is False
    assert actions[0]["error"] == "appliances.template: no VM or template named 'no-such-template'"
    assert all(a["skipped"] for a in actions[1:])
    bad = _run(env, "--config", str(tmp_path / "missing.toml"), "appliances", "reconcile")
    assert bad.exit_code == 2
