"""Table tests for ``appliances.plan_upgrade`` (pure), the standby rules ``plan`` follows
during an upgrade, and the OVA manifest reader of ``fleet.image``."""

from __future__ import annotations

import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
from test_appliance_plan import GOOD, H1, H2, H3, kinds, pin, vm

from vsphere_av.errors import ApplianceError
from vsphere_av.fleet import plan as ap
from vsphere_av.fleet.image import IMAGE_KEY, read_manifest, unpack_ova

OLD = "sha256:" + "a" * 64
NEW = "sha256:" + "b" * 64
D = ap.Desired(image=NEW, addresses=("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"))


def on(image: str, vm_id: str, host: ap.FleetHost, **kw: object) -> ap.ApplianceVm:
    extra = {**ap.expected_extra_config(host.id), IMAGE_KEY: image}
    extra.update(kw.pop("more", {}))    # type: ignore[call-overload]
    return vm(vm_id, host, extra=extra, **kw)    # type: ignore[arg-type]


def standby(vm_id: str, host: ap.FleetHost, old: str) -> ap.ApplianceVm:
    return on(NEW, vm_id, host, name=f"vsphere-av-appliance-{host.name}-bbbbbbbb",
              more={ap.STANDBY_KEY: old}, pinned=False)


OLD_FLEET = ap.Observed(hosts=(H1, H2, H3), appliances=(
    on(OLD, "vm-1", H1), on(NEW, "vm-2", H2), vm("vm-3", H3)), pins=GOOD.pins)

UPGRADE_CASES: list[tuple[str, ap.Observed, list[tuple[str, str, str]]]] = [
    ("old image and unrecorded image replaced, current one skipped", OLD_FLEET,
     [("replace", "esx1", "image " + OLD + " -> " + NEW),
      ("skip", "esx2", "already on the image"),
      ("replace", "esx3", "image unrecorded -> " + NEW)]),
    ("no appliance: reconcile first", ap.Observed(hosts=(H1,)),
     [("skip", "esx1", "no appliance: run appliances reconcile")]),
    ("maintenance and disconnected hosts are left alone",
     ap.Observed(hosts=(replace(H1, maintenance=True), replace(H2, connected=False)),
                 appliances=(on(OLD, "vm-1", H1), on(OLD, "vm-2", H2))),
     [("skip", "esx1", "host in maintenance mode"), ("skip", "esx2", "host disconnected")]),
    ("a powered-off appliance is not replaced (nothing serves to move from)",
     ap.Observed(hosts=(H1,), appliances=(on(OLD, "vm-1", H1, power=ap.POWERED_OFF),)),
     [("skip", "esx1", "its appliance is not running on it: run appliances reconcile")]),
    ("two active appliances: reconcile first",
     ap.Observed(hosts=(H1,), appliances=(on(OLD, "vm-1", H1), on(OLD, "vm-9", H1))),
     [("skip", "esx1", "several appliances: run appliances reconcile")]),
    ("a leftover standby is removed first, the old one is still the one replaced",
     ap.Observed(hosts=(H1,), appliances=(on(OLD, "vm-1", H1), standby("vm-5", H1, "vm-1"))),
     [("replace", "esx1", "image " + OLD + " -> " + NEW)]),
]


@pytest.mark.parametrize(("observed", "expected"), [c[1:] for c in UPGRADE_CASES],
                         ids=[c[0] for c in UPGRADE_CASES])
def test_plan_upgrade(observed: ap.Observed, expected: list[tuple[str, str, str]]) -> None:
    steps = ap.plan_upgrade(D, observed)
    assert [(s.kind, s.host, s.reason) for s in steps] == expected
    assert ap.plan_upgrade(D, observed) == steps            # pure: same answer twice


def test_replace_step_deploys_a_standby_beside_the_old_one() -> None:
    observed = ap.Observed(hosts=(H1,), appliances=(on(OLD, "vm-1", H1),
                                                     standby("vm-5", H1, "vm-1")))
    (step,) = ap.plan_upgrade(D, observed)
    extra = dict(step.extra_config)
    assert step.old_vm_id == "vm-1"
    assert step.new_vm == "vsphere-av-appliance-esx1-bbbbbbbb"   # beside it, another name
    assert step.remove_first == ("vm-5",)
    assert extra[ap.STANDBY_KEY] == "vm-1"
    assert extra[IMAGE_KEY] == NEW
    assert extra[ap.HOST_KEY] == H1.id
    assert extra[ap.ADDRESS_KEY] == "10.0.0.1"                   # a free pool address
    assert {k: extra[k] for k in ap.HARDENING} == dict(ap.HARDENING)
    assert step.cluster_id == H1.cluster_id


def test_plan_upgrade_needs_an_image() -> None:
    with pytest.raises(ApplianceError, match="needs an image"):
        ap.plan_upgrade(ap.Desired(), OLD_FLEET)


def test_reconcile_leaves_a_live_standby_and_its_old_appliance_alone() -> None:
    observed = ap.Observed(hosts=(H1,), appliances=(on(OLD, "vm-1", H1),
                                                     standby("vm-5", H1, "vm-1")),
                           pins=(pin(H1, "vm-1"),))
    assert ap.plan(D, observed) == []                  # neither is a "duplicate"


def test_reconcile_promotes_a_standby_whose_old_appliance_is_gone() -> None:
    observed = ap.Observed(hosts=(H1,), appliances=(replace(standby("vm-5", H1, "vm-1"),
                                                            drs_disabled=True,
                                                            ha_disabled=True),),
                           pins=(pin(H1, "vm-5"),))
    actions = ap.plan(D, observed)
    assert kinds(actions) == [("configure", "host-1", "vm-5")]
    assert dict(actions[0].extra_config) == {ap.STANDBY_KEY: ""}


def test_after_the_move_reconcile_keeps_the_appliance_on_the_image() -> None:
    """Both active (standby mark cleared, old not yet destroyed): the old one goes."""
    new = on(NEW, "vm-5", H1, name="vsphere-av-appliance-esx1-bbbbbbbb")
    observed = ap.Observed(hosts=(H1,), appliances=(on(OLD, "vm-1", H1), new),
                           pins=(pin(H1, "vm-5"),))
    assert kinds(ap.plan(D, observed)) == [("destroy", "host-1", "vm-1")]


def test_image_key_is_recorded_at_deploy_and_never_drift() -> None:
    actions = ap.plan(D, ap.Observed(hosts=(H3,)))
    assert dict(actions[0].extra_config)[IMAGE_KEY] == NEW
    assert ap.plan(D, ap.Observed(hosts=(H3,), appliances=(on(OLD, "vm-3", H3),))) == []


MANIFESTS = [
    ("SHA256(a.ovf)= " + "A" * 64 + "\n\n", {"a.ovf": "a" * 64}),
    ("SHA256 (a.vmdk) = " + "0" * 64, {"a.vmdk": "0" * 64}),
]


@pytest.mark.parametrize(("text", "expected"), MANIFESTS)
def test_read_manifest(text: str, expected: dict[str, str]) -> None:
    assert read_manifest(text, name="x.mf") == expected


@pytest.mark.parametrize(("text", "message"), [
    ("SHA1(a.ovf)= " + "0" * 40, "SHA1 is not SHA-256"),
    ("a.ovf " + "0" * 64, "line 1 is malformed"),
])
def test_read_manifest_refuses(text: str, message: str) -> None:
    with pytest.raises(ApplianceError, match=message):
        read_manifest(text, name="x.mf")


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    import io

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(("members", "message"), [
    ({"x.mf": b"", "a.ovf": b"<x/>"}, "the first member is 'x.mf'"),
    ({"a.ovf": b"<x/>"}, r"no SHA-256 manifest \(.mf\)"),
    ({"a.ovf": b"<x/>", "../b.vmdk": b"x", "a.mf": b""}, "not a plain file at the top"),
    ({"a.ovf": b"<x/>", "a.mf": b""}, "a.ovf is not in the manifest"),
])
def test_unpack_ova_refuses(tmp_path: Path, members: dict[str, bytes], message: str) -> None:
    ova = _tar(tmp_path / "a.ova", members)
    with pytest.raises(ApplianceError, match=message):
        unpack_ova(ova, tmp_path / "out")


def test_unpack_ova_refuses_a_manifest_line_for_a_missing_member(tmp_path: Path) -> None:
    import hashlib

    ovf = b"<x/>"
    mf = (f"SHA256(a.ovf)= {hashlib.sha256(ovf).hexdigest()}\n"
          f"SHA256(a-disk1.vmdk)= {'0' * 64}\n").encode()
    ova = _tar(tmp_path / "a.ova", {"a.ovf": ovf, "a.mf": mf})
    with pytest.raises(ApplianceError, match=r"names a-disk1\.vmdk, which the OVA does not"):
        unpack_ova(ova, tmp_path / "out")
    good = _tar(tmp_path / "b.ova", {"a.ovf": ovf, "a.mf": mf.splitlines(True)[0]})
    assert unpack_ova(good, tmp_path / "out2") == tmp_path / "out2" / "a.ovf"
