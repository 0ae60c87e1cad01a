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
from pathlib import Path

import pytest

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
    assert f"parentCID={parent_cid:08x}".encode() in head
    # Only the clusters that changed: far less than the 3 MiB file both trees hold.
    assert delta.stat().st_size < MiB
    raw = to_raw(delta, tmp_path / "chain.raw")
    assert debugfs(raw, MiB, "cat /etc/hostname") == "web02\n"
    # The parent alone still shows the older tree.
    old = to_raw(base, tmp_path / "base.raw")
    assert debugfs(old, MiB, "cat /etc/hostname") == "web01\n"
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
