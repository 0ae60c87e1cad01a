"""Integration tests for vcsim/mkdisk.sh: real VMDKs built from a directory tree.

Every image is read back with tools independent of the script: qemu-img (format, chain,
contents), sfdisk (partition table), debugfs (ext4), ntfscat/ntfsinfo (NTFS), lvm2 (PV/VG/LV
metadata) and cryptsetup (LUKS header).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from vsphere_av import errors
from vsphere_av.lab import simulator

ROOT = Path(__file__).resolve().parents[2]
MKDISK = ROOT / "vcsim" / "mkdisk.sh"
MiB = 1024 * 1024
TOOLS = (
    "qemu-img",
    "mke2fs",
    "debugfs",
    "mkntfs",
    "ntfs-3g",
    "ntfscat",
    "sfdisk",
    "lvm",
    "cryptsetup",
)

pytestmark = pytest.mark.skipif(
    os.environ.get("CI") != "true" and any(shutil.which(t) is None for t in TOOLS),
    reason="disk tools missing (make system-deps installs them)",
)


def mkdisk(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MKDISK), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def build(*args: str | Path) -> float:
    start = time.monotonic()
    r = mkdisk(*args)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    return time.monotonic() - start


def info(path: Path) -> dict:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def to_raw(vmdk: Path, raw: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(vmdk), str(raw)], check=True)
    return raw


def partitions(raw: Path) -> dict:
    out = subprocess.run(["sfdisk", "-J", str(raw)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["partitiontable"]


def debugfs(raw: Path, offset: int, request: str) -> str:
    r = subprocess.run(
        ["debugfs", "-R", request, f"{raw}?offset={offset}"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def carve(raw: Path, offset: int, out: Path) -> Path:
    with raw.open("rb") as src, out.open("wb") as dst:
        src.seek(offset)
        shutil.copyfileobj(src, dst, 4 * MiB)
    return out


@pytest.fixture
def linux_tree(tmp_path: Path) -> Path:
    root = tmp_path / "linux"
    (root / "etc" / "cron.d").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("web01\n")
    (root / "etc" / "cron.d" / "x").write_text("* * * * * root /tmp/.x\n")
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "big").write_bytes(os.urandom(3 * MiB))
    (root / "etc" / "alias").symlink_to("hostname")
    os.utime(root / "etc" / "hostname", (1577934245, 1577934245))  # 2020-01-02 03:04:05 UTC
    return root


@pytest.fixture
def windows_tree(tmp_path: Path) -> Path:
    root = tmp_path / "C"
    (root / "Windows" / "Temp").mkdir(parents=True)
    (root / "Windows" / "Temp" / "x.exe").write_bytes(b"MZ\x90\x00evil")
    (root / "Users" / "Public").mkdir(parents=True)
    (root / "Users" / "Public" / "notes.txt").write_text("hello\r\n")
    os.utime(root / "Windows" / "Temp" / "x.exe", (1620284889, 1620284889))  # 2021-05-06 07:08:09
    return root


def test_ext4_gpt_sparse_reads_back(linux_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "vm.vmdk"
    took = build("--src", linux_tree, "--out", out, "--fs", "ext4")
    assert took < 20
    meta = info(out)
    assert meta["format"] == "vmdk"
    assert meta["format-specific"]["data"]["create-type"] == "monolithicSparse"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linux", "vm.vmdk"]
    # Sparse: about the 3 MiB of data, not the whole virtual disk.
    assert out.stat().st_size < meta["virtual-size"]
    raw = to_raw(out, tmp_path / "vm.raw")
    table = partitions(raw)
    assert table["label"] == "gpt"
    [part] = table["partitions"]
    assert part["start"] == 2048
    assert part["type"] == "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    assert debugfs(raw, MiB, "cat /etc/cron.d/x") == "* * * * * root /tmp/.x\n"
    assert "mtime: 0x5e0d5da5:00000000 -- Thu Jan  2 03:04:05 2020" in debugfs(
        raw, MiB, "stat /etc/hostname"
    )
    assert 'Fast link dest: "hostname"' in debugfs(raw, MiB, "stat /etc/alias")
    dumped = tmp_path / "big"
    debugfs(raw, MiB, f"dump /usr/bin/big {dumped}")
    assert dumped.read_bytes() == (linux_tree / "usr" / "bin" / "big").read_bytes()


def test_ntfs_mbr_reads_back(windows_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "win.vmdk"
    build("--src", windows_tree, "--out", out, "--fs", "ntfs", "--table", "mbr")
    raw = to_raw(out, tmp_path / "win.raw")
    table = partitions(raw)
    assert table["label"] == "dos"
    [part] = table["partitions"]
    assert (part["start"], part["type"]) == (2048, "7")
    volume = carve(raw, MiB, tmp_path / "win.part")
    got = subprocess.run(
        ["ntfscat", str(volume), "Windows/Temp/x.exe"], capture_output=True, check=True
    ).stdout
    assert got == b"MZ\x90\x00evil"
    stat = subprocess.run(
        ["ntfsinfo", "-F", "/Windows/Temp/x.exe", str(volume)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "File Altered Time:\t Thu May  6 07:08:09 2021 UTC" in stat


def test_lvm_volume(linux_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "lvm.vmdk"
    build("--src", linux_tree, "--out", out, "--fs", "ext4", "--lvm")
    raw = to_raw(out, tmp_path / "lvm.raw")
    [part] = partitions(raw)["partitions"]
    assert part["type"] == "E6D6D379-F507-44C2-A23C-238F2A3DF928"
    pv = carve(raw, MiB, tmp_path / "pv.raw")
    # lvm2 itself reads the metadata back (a loop device over the carved partition).
    loop = subprocess.run(
        ["losetup", "-f", "--show", "-r", str(pv)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        lvs = subprocess.run(
            [
                "lvm",
                "lvs",
                "--driverloaded",
                "n",
                "--devices",
                loop,
                "--noheadings",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "vg_name,lv_name,lv_size,seg_pe_ranges",
                "--config",
                "devices { obtain_device_list_from_udev=0 use_devicesfile=0 }",
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"},
        ).stdout.split()
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    assert lvs[:2] == ["vg0", "root"]
    assert lvs[3] == f"{loop}:0-{int(lvs[2]) // MiB - 1}"
    # pe_start is 1 MiB into the PV: the file system starts 2 MiB into the disk.
    assert debugfs(raw, 2 * MiB, "cat /etc/hostname") == "web01\n"


def test_luks_header(linux_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "luks.vmdk"
    build("--src", linux_tree, "--out", out, "--fs", "ext4", "--luks", "--table", "mbr")
    raw = to_raw(out, tmp_path / "luks.raw")
    volume = carve(raw, MiB, tmp_path / "luks.part")
    dump = subprocess.run(["cryptsetup", "luksDump", str(volume)], capture_output=True, text=True)
    assert dump.returncode == 0, dump.stderr
    assert "Version:       \t2" in dump.stdout


@pytest.mark.parametrize("fmt", ["monolithicFlat", "streamOptimized"])
def test_other_formats(fmt: str, linux_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "vm.vmdk"
    build("--src", linux_tree, "--out", out, "--fs", "ext4", "--table", "none", "--format", fmt)
    assert info(out)["format-specific"]["data"]["create-type"] == fmt
    files = sorted(p.name for p in tmp_path.iterdir() if p.name != "linux")
    if fmt == "monolithicFlat":
        assert files == ["vm-flat.vmdk", "vm.vmdk"]
        sectors = info(out)["virtual-size"] // 512
        assert f'RW {sectors} FLAT "vm-flat.vmdk" 0' in out.read_text().splitlines()
    else:
        assert files == ["vm.vmdk"]
    raw = to_raw(out, tmp_path / "vm.raw")
    assert debugfs(raw, 0, "cat /etc/hostname") == "web01\n"


def test_xfs(linux_tree: Path, tmp_path: Path) -> None:
    if not Path("/dev/loop-control").exists():
        pytest.skip("xfs images need a loop device")
    out = tmp_path / "xfs.vmdk"
    build("--src", linux_tree, "--out", out, "--fs", "xfs", "--table", "none")
    raw = to_raw(out, tmp_path / "xfs.raw")
    assert raw.read_bytes()[:4] == b"XFSB"
    r = subprocess.run(["xfs_db", "-r", "-c", "ls /etc", str(raw)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "hostname" in r.stdout


def test_delta_chain_reads_newer_tree(linux_tree: Path, tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    ds.mkdir()
    base = ds / "vm.vmdk"
    build("--src", linux_tree, "--out", base, "--fs", "ext4")
    (linux_tree / "etc" / "hostname").write_text("web02\n")
    delta = ds / "vm-000001.vmdk"
    took = build("--src", linux_tree, "--out", delta, "--fs", "ext4", "--parent", base)
    assert took < 20
    meta = info(delta)
    assert meta["backing-filename"] == "vm.vmdk"
    assert meta["format-specific"]["data"]["create-type"] == "monolithicSparse"
    assert meta["virtual-size"] == info(base)["virtual-size"]
    head = delta.read_bytes()[: 64 * 1024]
    parent_cid = info(base)["format-specific"]["data"]["cid"]
    assert b'parentFileNameHint="vm.vmdk"' in head
    assert f"parentCID={parent_cid:x}".encode() in head
    # Only the clusters that changed: far less than the 3 MiB file both trees hold. The disk
    # keeps its identifiers (GPT ids, file system UUID), so they are not among them.
    assert delta.stat().st_size < MiB
    mapping = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(delta)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    own = sum(m["length"] for m in mapping if m["depth"] == 0 and m["data"])
    assert 0 < own <= 4 * 64 * 1024
    raw = to_raw(delta, tmp_path / "chain.raw")
    assert debugfs(raw, MiB, "cat /etc/hostname") == "web02\n"
    # The parent alone still shows the older tree.
    old = to_raw(base, tmp_path / "base.raw")
    assert debugfs(old, MiB, "cat /etc/hostname") == "web01\n"
    assert partitions(old)["id"] == partitions(raw)["id"]
    # A second delta on the first one (a chain of three) with a new file: the file system is
    # rebuilt from the tree, so blocks after the new file move and the delta grows; the chain
    # still reads as the tree.
    (linux_tree / "etc" / "hostname").write_text("web03\n")
    (linux_tree / "etc" / "cron.d" / "y").write_text("new\n")
    build("--src", linux_tree, "--out", ds / "vm-000002.vmdk", "--fs", "ext4", "--parent", delta)
    raw3 = to_raw(ds / "vm-000002.vmdk", tmp_path / "chain3.raw")
    assert debugfs(raw3, MiB, "cat /etc/hostname") == "web03\n"
    assert debugfs(raw3, MiB, "cat /etc/cron.d/y") == "new\n"
    assert info(ds / "vm-000002.vmdk")["backing-filename"] == "vm-000001.vmdk"
    assert sorted(p.name for p in ds.iterdir()) == ["vm-000001.vmdk", "vm-000002.vmdk", "vm.vmdk"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--src", "/nonexistent", "--fs", "ext4"], "mkdisk: not a directory: /nonexistent"),
        (["--fs", "zfs"], "mkdisk: --fs must be ext4, ntfs or xfs"),
        (["--fs", "ext4", "--size-mib", "2"], "mkdisk: --size-mib 2 is too small"),
        (["--fs", "ext4", "--format", "vmfsSparse"], "mkdisk: --format must be"),
        (["--fs", "ext4", "--bogus"], "mkdisk: unknown argument: --bogus"),
        (["--fs", "ext4", "--parent", "/nonexistent.vmdk"], "mkdisk: parent disk not found"),
    ],
)
def test_errors_one_line_no_leftovers(
    args: list[str], message: str, linux_tree: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    full = ["--src", str(linux_tree), "--out", str(out / "vm.vmdk"), *args]
    env_tmp = tmp_path / "tmp"
    env_tmp.mkdir()
    r = subprocess.run(
        [str(MKDISK), *full],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(env_tmp)},
    )
    assert r.returncode != 0
    assert r.stdout == ""
    assert r.stderr.startswith(message), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert list(out.iterdir()) == []
    assert list(env_tmp.iterdir()) == []


# --- The simulator with -disks: every VM's disk is a real image of its guest tree. ---------

GUEST_LINUX, GUEST_WINDOWS, GUEST_LVM = 0, 1, 2


@dataclass
class DiskSim:
    sim: simulator.Simulator
    si: vim.ServiceInstance

    def vms(self) -> list[vim.VirtualMachine]:
        content = self.si.RetrieveContent()
        view = content.viewManager.CreateContainerView(
            content.rootFolder, [vim.VirtualMachine], True
        )
        try:
            return sorted(view.view, key=lambda v: v.name)
        finally:
            view.Destroy()

    def cookie(self) -> str:
        return str(self.si._stub.cookie)  # vmware_soap_session="..."

    def get(self, url: str, **kw: Any) -> requests.Response:
        return requests.get(url, verify=str(self.sim.cert_file), timeout=30, **kw)


@pytest.fixture(scope="module")
def dsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiskSim]:
    root = tmp_path_factory.mktemp("vcsim-disk-guests")
    for n in range(3):
        etc = root / f"DC0_C0_RP0_VM{n}" / "etc"
        etc.mkdir(parents=True)
        (etc / "hostname").write_text(f"vm{n}\n")
    start = time.monotonic()
    try:
        running = simulator.start(guest_root=root, hosts=1, vms=3, disks=True)
    except errors.SimulatorMissing as exc:
        pytest.fail(str(exc))
    assert time.monotonic() - start < 30  # three disks built at start
    try:
        si = SmartConnect(
            host=running.host,
            port=running.port,
            user=running.username,
            pwd=running.password,
            sslContext=running.ssl_context(),
        )
        yield DiskSim(running, si)
        Disconnect(si)
    finally:
        running.stop()


def disk_of(vm: vim.VirtualMachine) -> vim.vm.device.VirtualDisk:
    [disk] = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    return disk


def ds_dir(vm: vim.VirtualMachine) -> Path:
    return Path(vm.datastore[0].info.url)


def host_file(vm: vim.VirtualMachine, ds_path: str) -> Path:
    name = ds_path.split("] ", 1)[1]
    return ds_dir(vm) / name


def chain_names(vm: vim.VirtualMachine) -> list[str]:
    names = []
    b = disk_of(vm).backing
    while b is not None:
        names.append(b.fileName)
        b = b.parent
    return names


def read_tree_file(vm: vim.VirtualMachine, ds_path: str, guest_path: str, tmp: Path) -> str:
    raw = to_raw(host_file(vm, ds_path), tmp / "read.raw")
    try:
        return debugfs(raw, MiB, f"cat {guest_path}")
    finally:
        raw.unlink()


def folder_url(dsim: DiskSim, vm: vim.VirtualMachine, name: str) -> str:
    return (
        f"https://127.0.0.1:{dsim.sim.port}/folder/{vm.name}/{name}"
        f"?dcPath=DC0&dsName={vm.datastore[0].name}"
    )


def test_disks_built_at_start(dsim: DiskSim, tmp_path: Path) -> None:
    vm = dsim.vms()[GUEST_LINUX]
    disk = disk_of(vm)
    assert chain_names(vm) == [f"[LocalDS_0] {vm.name}/disk1.vmdk"]
    image = host_file(vm, disk.backing.fileName)
    meta = info(image)
    assert meta["format-specific"]["data"]["create-type"] == "monolithicSparse"
    assert disk.capacityInBytes == meta["virtual-size"]
    assert disk.capacityInKB == meta["virtual-size"] // 1024
    assert not (image.parent / "disk1-flat.vmdk").exists()
    assert read_tree_file(vm, disk.backing.fileName, "/etc/hostname", tmp_path) == "vm0\n"
    [layout] = vm.layoutEx.disk
    assert layout.key == disk.key
    files = {f.key: f for f in vm.layoutEx.file}
    [unit] = layout.chain
    [key] = unit.fileKey
    assert files[key].name == disk.backing.fileName
    assert files[key].type == "diskDescriptor"
    assert files[key].size == image.stat().st_size


def test_power_off_rebuilds_windows_ntfs(dsim: DiskSim, tmp_path: Path) -> None:
    vm = dsim.vms()[GUEST_WINDOWS]
    WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(guestId="windows9_64Guest")))
    temp = dsim.sim.guest_root / vm.name / "C" / "Windows" / "Temp"
    temp.mkdir(parents=True)
    (temp / "x.exe").write_bytes(b"MZ-dormant")
    WaitForTask(vm.PowerOffVM_Task())
    raw = to_raw(host_file(vm, disk_of(vm).backing.fileName), tmp_path / "w.raw")
    assert partitions(raw)["partitions"][0]["type"] == "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
    part = carve(raw, MiB, tmp_path / "w.part")
    got = subprocess.run(
        ["ntfscat", str(part), "Windows/Temp/x.exe"], capture_output=True, check=True
    ).stdout
    assert got == b"MZ-dormant"
    WaitForTask(vm.PowerOnVM_Task())


def test_snapshot_delta_chain_and_consolidation(dsim: DiskSim, tmp_path: Path) -> None:
    vm = dsim.vms()[GUEST_LINUX]
    etc = dsim.sim.guest_root / vm.name / "etc"
    (etc / "hostname").write_text("before-snapshot\n")
    assert vm.runtime.powerState == "poweredOn"
    WaitForTask(vm.CreateSnapshot_Task(name="scan", description="", memory=False, quiesce=False))
    base = f"[LocalDS_0] {vm.name}/disk1.vmdk"
    delta = f"[LocalDS_0] {vm.name}/disk1-000001.vmdk"
    assert chain_names(vm) == [delta, base]
    assert disk_of(vm).backing.deltaDiskFormat == "redoLogFormat"
    # The parent now holds the tree as it was when the snapshot was taken.
    assert read_tree_file(vm, base, "/etc/hostname", tmp_path) == "before-snapshot\n"
    assert info(host_file(vm, delta))["backing-filename"] == "disk1.vmdk"
    # layoutEx: the disk's chain is parent then delta, and the snapshot names the parent.
    files = {f.key: f for f in vm.layoutEx.file}
    [layout] = vm.layoutEx.disk
    assert [[files[k].name for k in u.fileKey] for u in layout.chain] == [[base], [delta]]
    [snap_layout] = vm.layoutEx.snapshot
    assert [[files[k].name for k in u.fileKey] for u in snap_layout.disk[0].chain] == [[base]]
    # The guest keeps writing; powering off brings the delta up to date, not the parent.
    (etc / "hostname").write_text("after-snapshot\n")
    WaitForTask(vm.PowerOffVM_Task())
    assert read_tree_file(vm, delta, "/etc/hostname", tmp_path) == "after-snapshot\n"
    assert read_tree_file(vm, base, "/etc/hostname", tmp_path) == "before-snapshot\n"
    # Removing the snapshot consolidates: one file again, holding the current tree.
    WaitForTask(vm.snapshot.rootSnapshotList[0].snapshot.RemoveSnapshot_Task(removeChildren=False))
    assert chain_names(vm) == [base]
    assert not host_file(vm, delta).exists()
    assert read_tree_file(vm, base, "/etc/hostname", tmp_path) == "after-snapshot\n"
    assert [len(d.chain) for d in vm.layoutEx.disk] == [1]
    assert all("disk1-000001" not in f.name for f in vm.layoutEx.file)
    WaitForTask(vm.PowerOnVM_Task())


def test_two_snapshots_and_revert(dsim: DiskSim, tmp_path: Path) -> None:
    vm = dsim.vms()[GUEST_LINUX]
    etc = dsim.sim.guest_root / vm.name / "etc"
    (etc / "hostname").write_text("one\n")
    WaitForTask(vm.CreateSnapshot_Task(name="s1", description="", memory=False, quiesce=False))
    (etc / "hostname").write_text("two\n")
    WaitForTask(vm.CreateSnapshot_Task(name="s2", description="", memory=False, quiesce=False))
    names = [f"[LocalDS_0] {vm.name}/disk1{s}.vmdk" for s in ("-000002", "-000001", "")]
    assert chain_names(vm) == names
    assert read_tree_file(vm, names[1], "/etc/hostname", tmp_path) == "two\n"
    assert read_tree_file(vm, names[2], "/etc/hostname", tmp_path) == "one\n"
    s1 = vm.snapshot.rootSnapshotList[0].snapshot
    WaitForTask(s1.RevertToSnapshot_Task())
    # Back on s1: a new empty delta over the s1 disk; s2 stays in the snapshot tree.
    assert chain_names(vm) == names[1:]
    assert read_tree_file(vm, names[1], "/etc/hostname", tmp_path) == "one\n"
    WaitForTask(vm.RemoveAllSnapshots_Task())
    assert chain_names(vm) == names[2:]
    assert not host_file(vm, names[1]).exists()
    assert not host_file(vm, names[0]).exists()
    assert read_tree_file(vm, names[2], "/etc/hostname", tmp_path) == "one\n"


def test_layout_keys_lvm_flat_luks(dsim: DiskSim, tmp_path: Path) -> None:
    vm = dsim.vms()[GUEST_LVM]
    spec = vim.vm.ConfigSpec(
        extraConfig=[
            vim.option.OptionValue(key="vcsim.disk.layout", value="lvm"),
            vim.option.OptionValue(key="vcsim.disk.format", value="monolithicFlat"),
        ]
    )
    WaitForTask(vm.ReconfigVM_Task(spec=spec))
    WaitForTask(vm.PowerOffVM_Task())
    image = host_file(vm, disk_of(vm).backing.fileName)
    assert info(image)["format-specific"]["data"]["create-type"] == "monolithicFlat"
    flat = image.with_name("disk1-flat.vmdk")
    with flat.open("rb") as f:
        f.seek(MiB + 512)
        assert f.read(8) == b"LABELONE"
    assert debugfs(flat, 2 * MiB, "cat /etc/hostname") == "vm2\n"
    files = {f.key: f for f in vm.layoutEx.file}
    [unit] = vm.layoutEx.disk[0].chain
    assert [(files[k].name.rsplit("/", 1)[1], files[k].type) for k in unit.fileKey] == [
        ("disk1.vmdk", "diskDescriptor"),
        ("disk1-flat.vmdk", "diskExtent"),
    ]
    WaitForTask(vm.PowerOnVM_Task())
    luks = vim.vm.ConfigSpec(
        extraConfig=[
            vim.option.OptionValue(key="vcsim.disk.layout", value="mbr"),
            vim.option.OptionValue(key="vcsim.disk.format", value="streamOptimized"),
            vim.option.OptionValue(key="vcsim.disk.luks", value="TRUE"),
        ]
    )
    WaitForTask(vm.ReconfigVM_Task(spec=luks))
    WaitForTask(vm.PowerOffVM_Task())
    assert not flat.exists()
    assert info(image)["format-specific"]["data"]["create-type"] == "streamOptimized"
    raw = to_raw(image, tmp_path / "luks.raw")
    assert partitions(raw)["label"] == "dos"
    with raw.open("rb") as f:
        f.seek(MiB)
        assert f.read(6) == b"LUKS\xba\xbe"
    WaitForTask(vm.PowerOnVM_Task())


def test_independent_disk_and_memory_snapshot(dsim: DiskSim) -> None:
    vm = dsim.vms()[GUEST_LVM]
    disk = disk_of(vm)
    disk.backing.diskMode = "independent_persistent"
    change = vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)
    WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[change])))
    assert disk_of(vm).backing.diskMode == "independent_persistent"
    with pytest.raises(vim.fault.MemorySnapshotOnIndependentDisk):
        WaitForTask(vm.CreateSnapshot_Task(name="m", description="", memory=True, quiesce=False))
    assert vm.snapshot is None
    # Without memory the snapshot is taken and the independent disk stays out of it.
    before = chain_names(vm)
    WaitForTask(vm.CreateSnapshot_Task(name="n", description="", memory=False, quiesce=False))
    assert chain_names(vm) == before
    WaitForTask(vm.RemoveAllSnapshots_Task())


def test_snapshot_disabled_flag(dsim: DiskSim) -> None:
    vm = dsim.vms()[GUEST_LINUX]
    off = vim.vm.FlagInfo(snapshotDisabled=True)
    WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(flags=off)))
    task = vm.CreateSnapshot_Task(name="x", description="", memory=False, quiesce=False)
    with pytest.raises(vim.fault.SnapshotDisabled):
        WaitForTask(task)
    assert task.info.entity == vm
    assert vm.snapshot is None
    on = vim.vm.FlagInfo(snapshotDisabled=False)
    WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(flags=on)))
    WaitForTask(vm.CreateSnapshot_Task(name="y", description="", memory=False, quiesce=False))
    assert vm.snapshot is not None
    WaitForTask(vm.RemoveAllSnapshots_Task())


def test_folder_needs_session_or_ticket(dsim: DiskSim) -> None:
    vm = dsim.vms()[GUEST_LINUX]
    image = host_file(vm, disk_of(vm).backing.fileName)
    url = folder_url(dsim, vm, "disk1.vmdk")
    want = image.read_bytes()[512:1536]
    # No credentials: 401 with a challenge, as ESXi.
    r = dsim.get(url, headers={"Range": "bytes=512-1535"})
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Basic")
    # The vCenter session cookie: a Range read.
    r = dsim.get(url, headers={"Range": "bytes=512-1535", "Cookie": dsim.cookie()})
    assert r.status_code == 206
    assert r.content == want
    # A logged-out or forged session is refused.
    forged = 'vmware_soap_session="0123456789abcdef"'
    assert dsim.get(url, headers={"Cookie": forged}).status_code == 401
    # A generic service ticket: once, for this URL and method only.
    sm = dsim.si.RetrieveContent().sessionManager

    def ticket(method: str, for_url: str) -> str:
        spec = vim.SessionManager.HttpServiceRequestSpec(method=method, url=for_url)
        return str(sm.AcquireGenericServiceTicket(spec).id)

    t = ticket("httpGet", url)
    headers = {"Range": "bytes=512-1535", "Cookie": f"vmware_cgi_ticket={t}"}
    r = dsim.get(url, headers=headers)
    assert r.status_code == 206
    assert r.content == want
    assert dsim.get(url, headers=headers).status_code == 403  # used
    other = ticket("httpGet", folder_url(dsim, vm, "DC0_C0_RP0_VM0.vmx"))
    assert dsim.get(url, headers={"Cookie": f"vmware_cgi_ticket={other}"}).status_code == 403
    put = ticket("httpPut", url)
    assert dsim.get(url, headers={"Cookie": f"vmware_cgi_ticket={put}"}).status_code == 403
    # ticket acquired by govc's way (no dcPath in the URL) still matches with dcPath given
    bare = url.split("?")[0] + f"?dsName={vm.datastore[0].name}"
    t = ticket("httpGet", bare)
    r = dsim.get(url, headers={"Range": "bytes=0-3", "Cookie": f"vmware_cgi_ticket={t}"})
    assert r.status_code == 206
    assert r.content == image.read_bytes()[:4]
    # Basic authentication with the vCenter login.
    r = dsim.get(url, auth=(dsim.sim.username, dsim.sim.password), headers={"Range": "bytes=0-3"})
    assert r.status_code == 206
    assert dsim.get(url, auth=(dsim.sim.username, "wrong")).status_code == 401


def test_inaccessible_datastore_files_answer_404(dsim: DiskSim) -> None:
    vm = dsim.vms()[GUEST_WINDOWS]
    url = folder_url(dsim, vm, "disk1.vmdk")
    cookie = {"Cookie": dsim.cookie(), "Range": "bytes=0-3"}
    assert dsim.get(url, headers=cookie).status_code == 206
    off = vim.option.OptionValue(key="vcsim.disk.inaccessible", value="TRUE")
    WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(extraConfig=[off])))
    assert dsim.get(url, headers=cookie).status_code == 404
    on = vim.option.OptionValue(key="vcsim.disk.inaccessible", value="FALSE")
    WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(extraConfig=[on])))
    assert dsim.get(url, headers=cookie).status_code == 206


def test_suspend_rebuilds_and_clone_gets_its_own_disk(dsim: DiskSim, tmp_path: Path) -> None:
    vm = dsim.vms()[GUEST_LINUX]
    (dsim.sim.guest_root / vm.name / "etc" / "hostname").write_text("suspended\n")
    WaitForTask(vm.SuspendVM_Task())
    assert read_tree_file(vm, disk_of(vm).backing.fileName, "/etc/hostname", tmp_path) == (
        "suspended\n"
    )
    WaitForTask(vm.PowerOnVM_Task())
    spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(), powerOn=False)
    source = chain_names(vm)
    WaitForTask(vm.CloneVM_Task(folder=vm.parent, name="clone-a", spec=spec))
    clone = next(v for v in dsim.vms() if v.name == "clone-a")
    # The source keeps its own disk (the library alone points it at the clone's file).
    assert chain_names(vm) == source
    names = chain_names(clone)
    assert names == ["[LocalDS_0] clone-a/clone-a.vmdk"]
    image = host_file(clone, names[0])
    assert info(image)["format"] == "vmdk"
    assert read_tree_file(clone, names[0], "/etc/hostname", tmp_path) == "suspended\n"


def test_disks_off_by_default_and_flag_plumbing(tmp_path: Path) -> None:
    assert simulator.command_line(disks=True)[-1] == "-disks"
    assert "-disks" not in simulator.command_line()
    # A bad -mkdisk is a one-line start-up error.
    r = subprocess.run(
        [str(simulator.binary_path()), "-disks", f"-mkdisk={tmp_path / 'absent.sh'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr == "vcsim: error: -disks: mkdisk.sh not found (give -mkdisk PATH)\n"
    # Without -disks the library's empty placeholder files stay as they are.
    sim = simulator.start(guest_root=tmp_path / "g", hosts=1, vms=1)
    try:
        si = SmartConnect(
            host=sim.host,
            port=sim.port,
            user=sim.username,
            pwd=sim.password,
            sslContext=sim.ssl_context(),
        )
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(
            content.rootFolder, [vim.VirtualMachine], True
        )
        [vm] = view.view
        view.Destroy()
        image = host_file(vm, disk_of(vm).backing.fileName)
        assert image.stat().st_size == 0
        assert image.with_name("disk1-flat.vmdk").exists()
        Disconnect(si)
    finally:
        sim.stop()


def test_terminated_build_leaves_no_mount_or_files(windows_tree: Path, tmp_path: Path) -> None:
    # Stopped while ntfs-3g has the image mounted, the script unmounts it and removes
    # everything it made (the trap on EXIT runs after SIGTERM).
    for d in range(20):
        sub = windows_tree / "Data" / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(40):
            (sub / f"f{f}.bin").write_bytes(os.urandom(32 * 1024))
    out = tmp_path / "out"
    out.mkdir()
    env_tmp = tmp_path / "tmp"
    env_tmp.mkdir()
    proc = subprocess.Popen(
        [str(MKDISK), "--src", str(windows_tree), "--out", str(out / "w.vmdk"), "--fs", "ntfs"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(env_tmp)},
    )
    deadline = time.monotonic() + 30
    while str(env_tmp) not in Path("/proc/mounts").read_text():
        assert proc.poll() is None, "finished before it mounted: make the tree bigger"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert str(env_tmp) not in Path("/proc/mounts").read_text()
    assert list(env_tmp.iterdir()) == []
    assert list(out.iterdir()) == []
    assert err == b""
