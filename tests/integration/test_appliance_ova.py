"""Deploying a built appliance image (``appliances.ova``) on the bundled simulator.

The OVA is made here the way ``appliance/build.sh`` makes one: the placeholder descriptor
pointing at a small streamOptimized VMDK made by ``qemu-img``, a SHA-256 manifest, a ustar
tar with the descriptor first. Reconcile unpacks it, checks the manifest, and imports it
(CreateImportSpec, ImportVApp, the VMDK put through the NFC lease); a tampered OVA deploys
nothing. The simulator discards NFC uploads after reading them, so what went through the
lease is read from the adapter's upload record and the simulator's 200 answers.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import SimulatorFactory, env_for
from test_appliance_reconcile import make_rig

from vsphere_av.cli import main
from vsphere_av.config import DEFAULT_OVF
from vsphere_av.fleet import plan as ap
from vsphere_av.fleet.image import IMAGE_KEY, file_sha256

NAME = "test-appliance"
DISK = f"{NAME}-disk1.vmdk"


def build_ova(directory: Path, *, tamper: str = "",
              disk_text: bytes = b"vsphere-av test appliance disk\n") -> tuple[Path, Path]:
    """(ova, vmdk): ``tamper`` = "manifest" (a wrong digest for the disk) or "disk" (the
    disk changed after its manifest line was written)."""
    if shutil.which("qemu-img") is None:
        pytest.fail("qemu-img is missing: run `make system-deps` (qemu-utils)")
    stage = directory / "stage"
    stage.mkdir(parents=True)
    raw = directory / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(8 * 1024 * 1024)
        f.seek(1024 * 1024)
        f.write(disk_text * 1000)
    vmdk = stage / DISK
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", "-o",
                    "subformat=streamOptimized", str(raw), str(vmdk)], check=True)
    descriptor = Path(DEFAULT_OVF).read_text(encoding="utf-8")
    descriptor = re.sub(r'<File ovf:href="[^"]+" ovf:id="file1" ovf:size="\d+"/>',
                        f'<File ovf:href="{DISK}" ovf:id="file1" '
                        f'ovf:size="{vmdk.stat().st_size}"/>', descriptor)
    assert DISK in descriptor
    (stage / f"{NAME}.ovf").write_text(descriptor, encoding="utf-8")
    lines = [f"SHA256({n})= {file_sha256(stage / n)}" for n in (f"{NAME}.ovf", DISK)]
    if tamper == "manifest":
        lines[1] = f"SHA256({DISK})= {'0' * 64}"
    (stage / f"{NAME}.mf").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if tamper == "disk":
        with vmdk.open("ab") as f:
            f.write(b"\0" * 512)
    ova = directory / f"{NAME}.ova"
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in (f"{NAME}.ovf", f"{NAME}.mf", DISK):
            tar.add(stage / name, arcname=name)
    return ova, vmdk


def test_reconcile_deploys_the_ova_with_its_disk_through_the_lease(
        vcsim_factory: SimulatorFactory, tmp_path: Path) -> None:
    ova, vmdk = build_ova(tmp_path / "image")
    rig = make_rig(vcsim_factory(hosts=2, vms=0), tmp_path, ova=str(ova))
    try:
        assert rig.desired.image == f"sha256:{hashlib.sha256(ova.read_bytes()).hexdigest()}"
        dry = rig.reconcile(dry_run=True)
        deploys = [a for a in dry.actions if a.kind == "deploy"]
        assert len(deploys) == 2
        assert all(dict(a.extra_config)[IMAGE_KEY] == rig.desired.image for a in deploys)
        result = rig.reconcile()
        assert result.ok, [r.error for r in result.results if not r.ok]
        # Each deploy put the real VMDK (not the placeholder's 512 bytes) through its lease.
        assert rig.adapter.uploads == [(DISK, vmdk.stat().st_size)] * 2
        assert vmdk.stat().st_size > 4096
        apps = rig.appliances()
        assert len(apps) == 2
        assert {a.extra_config[IMAGE_KEY] for a in apps} == {rig.desired.image}
        assert {a.power_state for a in apps} == {ap.POWERED_ON}
        vm = rig.vm(apps[0].name)
        disks = [d for d in vm.config.hardware.device if d.__class__.__name__.endswith("Disk")]
        assert [d.capacityInKB for d in disks] == [2 * 1024 * 1024]   # the descriptor's 2 GiB
        audited = [e for e in rig.audit.entries() if e.action == "appliance.deploy"]
        assert [e.details["image"] for e in audited] == [rig.desired.image] * 2
        assert result.warnings == ()                       # a built image: no warning
        assert rig.reconcile().actions == ()               # converged: the image is not drift
    finally:
        rig.conn.close()
        rig.audit.close()


@pytest.mark.parametrize("tamper", ["manifest", "disk"])
def test_a_tampered_ova_deploys_nothing(vcsim_factory: SimulatorFactory, tmp_path: Path,
                                        tamper: str) -> None:
    ova, _ = build_ova(tmp_path / "image", tamper=tamper)
    rig = make_rig(vcsim_factory(hosts=1, vms=0), tmp_path, ova=str(ova))
    try:
        writes = rig.adapter.writes
        result = rig.reconcile()
        assert not result.ok
        deploy = next(r for r in result.results if r.action.kind == "deploy")
        assert deploy.error == f"OVA {NAME}.ova: {DISK} does not match its SHA-256 in {NAME}.mf"
        assert all(r.skipped for r in result.results if r.action.kind != "deploy")
        assert rig.appliances() == []
        assert rig.adapter.writes == writes                 # no import was even started
        assert rig.adapter.uploads == []
        failed = [e for e in rig.audit.entries() if e.action == "appliance.deploy.failed"]
        assert failed[0].details["error"] == deploy.error
    finally:
        rig.conn.close()
        rig.audit.close()


def _cli(env: dict[str, str], *args: str) -> Any:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_cli_tampered_ova_is_one_line_and_exit_2(vcsim_factory: SimulatorFactory,
                                                 tmp_path: Path) -> None:
    sim = vcsim_factory(hosts=1, vms=0)
    ova, _ = build_ova(tmp_path / "image", tamper="manifest")
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[appliances]\nenabled = true\nova = "{ova}"\n'
                   'addresses = ["127.0.0.71-127.0.0.72"]\n')
    env = env_for(sim, tmp_path / "state", VSPHERE_AV_CONFIG=str(cfg))
    result = _cli(env, "appliances", "reconcile", "--json")
    assert result.exit_code == 2
    errors = [a["error"] for a in json.loads(result.stdout)["actions"] if a["error"]]
    assert errors[0] == f"OVA {NAME}.ova: {DISK} does not match its SHA-256 in {NAME}.mf"
    assert "\n" not in errors[0]


def test_the_placeholder_is_named_in_the_dry_run_and_the_audit(vcsim_factory: SimulatorFactory,
                                                               tmp_path: Path) -> None:
    sim = vcsim_factory(hosts=1, vms=0)
    cfg = tmp_path / "config.toml"
    cfg.write_text('[appliances]\nenabled = true\naddresses = ["127.0.0.73-127.0.0.74"]\n')
    env = env_for(sim, tmp_path / "state", VSPHERE_AV_CONFIG=str(cfg))
    dry = _cli(env, "appliances", "reconcile", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "warning: appliances.ovf is the bundled placeholder" in dry.stderr
    document = json.loads(_cli(env, "appliances", "reconcile", "--dry-run", "--json").stdout)
    assert document["warnings"] == [dry.stderr.strip().removeprefix("warning: ")]
    assert _cli(env, "appliances", "reconcile").exit_code == 0
    out = _cli(env, "audit", "export")
    assert out.exit_code == 0, out.output
    text = out.stdout
    assert '"appliance.placeholder_image"' in text
    assert "vsphere-av-appliance-DC0_C0_H0" in text
