"""The disk file source against real disk images built by vcsim/mkdisk.sh (Debian's tools).

Every image is a real VMDK (qemu-img) holding a real partition table (sfdisk), LVM2 (lvm),
file system (mke2fs, mkntfs + ntfs-3g, mkfs.xfs, mkfs.vfat + mtools for the EFI system
partition) or LUKS2 header (cryptsetup); the reader sees them only through an opener, as it
will see a datastore.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import pytest

from vsphere_av import errors
from vsphere_av.scan.sources.diskimage import (
    DiskFile,
    DiskFiles,
    DiskLimits,
    VirtualDisk,
    open_virtual_disk,
    resolve_spec,
)
from vsphere_av.scan.sources.rangefile import RangeFile

MKDISK = Path(__file__).resolve().parents[2] / "vcsim" / "mkdisk.sh"
BIG = os.urandom(300_000)
CRON = b"* * * * * root /tmp/x\n"


def mkdisk(src: Path, out: Path, *args: str) -> Path:
    subprocess.run([str(MKDISK), "--src", str(src), "--out", str(out), *args], check=True,
                   capture_output=True, timeout=240)
    return out


def opener(directory: Path) -> Callable[[str], BinaryIO]:
    return lambda name: (directory / name).open("rb")


def open_local(path: Path) -> VirtualDisk:
    return open_virtual_disk(path.name, open_file=opener(path.parent))


def read_all(files: DiskFiles, roots: list[str] | None = None,
             problems: list[tuple[str, str]] | None = None) -> dict[str, bytes]:
    out: dict[str, bytes] = {}

    def on_error(path: str, exc: errors.DiskError) -> None:
        assert problems is not None, f"unexpected problem: {path}: {exc}"
        problems.append((path, str(exc)))

    for f in files.walk(roots or [], on_error=on_error):
        with files.open(f) as stream:
            out[f.path] = b"".join(stream.chunks())
        assert len(out[f.path]) == f.size
    return out


@pytest.fixture(scope="session")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("trees")
    linux = base / "linux"
    (linux / "etc" / "cron.d").mkdir(parents=True)
    (linux / "etc" / "cron.d" / "x").write_bytes(CRON)
    (linux / "etc" / "fstab").write_text("# static\nLABEL=root / ext4 defaults 0 1\n")
    (linux / "home" / "u").mkdir(parents=True)
    (linux / "home" / "u" / "big.bin").write_bytes(BIG)
    (linux / "home" / "u" / "link").symlink_to("/etc/fstab")
    changed = base / "linux2"
    shutil.copytree(linux, changed, symlinks=True)
    (changed / "etc" / "cron.d" / "x").write_bytes(b"changed\n")
    (changed / "etc" / "cron.d" / "y").write_bytes(b"added\n")
    windows = base / "windows"
    (windows / "Windows" / "Temp").mkdir(parents=True)
    (windows / "Windows" / "Temp" / "x.exe").write_bytes(b"MZ" + BIG[:5000])
    (windows / "Users" / "Public").mkdir(parents=True)
    (windows / "Users" / "Public" / "notes.txt").write_bytes(b"hello\n")
    return {"linux": linux, "linux2": changed, "windows": windows}


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


LINUX_FILES = {"/etc/cron.d/x": CRON, "/home/u/big.bin": BIG}


@pytest.mark.parametrize(("fs", "table", "fmt"), [
    ("ext4", "gpt", "monolithicSparse"),
    ("ext4", "mbr", "monolithicFlat"),
    ("ext4", "none", "streamOptimized"),
    ("xfs", "gpt", "monolithicSparse"),
])
def test_linux_disk_files_read_as_the_guest_names_them(trees: dict[str, Path], images: Path,
                                                       fs: str, table: str, fmt: str) -> None:
    path = mkdisk(trees["linux"], images / f"{fs}-{table}-{fmt}.vmdk", "--fs", fs,
                  "--table", table, "--format", fmt)
    disk = open_local(path)
    assert disk.create_type == fmt
    with DiskFiles.mount([disk]) as files:
        assert not files.windows
        [volume] = files.volumes
        assert (volume.filesystem, volume.mount, volume.label, volume.problem) == (
            fs, "/", "root", "")
        assert volume.kind == ("whole disk" if table == "none" else "partition")
        got = read_all(files, ["/"])
        assert {p: got[p] for p in LINUX_FILES} == LINUX_FILES
        assert set(got) == {*LINUX_FILES, "/etc/fstab"}       # the symlink is not a file
        entries = {f.path: f for f in files.walk(["/"])}
        again = {f.path: f for f in files.walk(["/"])}
        assert {p: f.file_id for p, f in entries.items()} == {
            p: f.file_id for p, f in again.items()}
        assert all(f.volume == volume.index and f.mtime_ns > 0 for f in entries.values())


def test_prune_and_roots_limit_the_walk(trees: dict[str, Path], images: Path) -> None:
    path = mkdisk(trees["linux"], images / "prune.vmdk", "--fs", "ext4")
    with DiskFiles.mount([open_local(path)]) as files:
        pruned = [f.path for f in files.walk(["/"], prune=lambda d: d == "/home")]
        assert sorted(pruned) == ["/etc/cron.d/x", "/etc/fstab"]
        assert [f.path for f in files.walk(["/etc/cron.d"])] == ["/etc/cron.d/x"]
        problems: list[tuple[str, str]] = []
        assert read_all(files, ["/nonexistent"], problems) == {}
        assert problems == [("/nonexistent", "/nonexistent: no such directory")]


def test_ntfs_on_mbr_is_drive_c_with_windows_paths(trees: dict[str, Path],
                                                   images: Path) -> None:
    path = mkdisk(trees["windows"], images / "win.vmdk", "--fs", "ntfs", "--table", "mbr")
    with DiskFiles.mount([open_local(path)]) as files:
        assert files.windows
        [volume] = files.volumes
        assert (volume.filesystem, volume.mount, volume.label) == ("ntfs", "C:", "Windows")
        got = read_all(files, ["C:\\"])
        assert got == {"C:\\Windows\\Temp\\x.exe": b"MZ" + BIG[:5000],
                       "C:\\Users\\Public\\notes.txt": b"hello\n"}
        temp = list(files.walk(["c:/windows/temp"]))    # Windows paths: any case, any slash
        assert [f.path for f in temp] == ["C:\\Windows\\Temp\\x.exe"]
        assert temp[0].file_id >= 24                   # an MFT record number, not metadata


def test_lvm_logical_volume_is_the_root(trees: dict[str, Path], images: Path) -> None:
    path = mkdisk(trees["linux"], images / "lvm.vmdk", "--fs", "ext4", "--lvm")
    with DiskFiles.mount([open_local(path)]) as files:
        pv, lv = files.volumes
        assert (pv.filesystem, pv.mount, pv.problem) == ("LVM2_member", "", "")
        assert (lv.name, lv.kind, lv.filesystem, lv.mount) == (
            "vg0/root", "logical volume", "ext4", "/")
        assert read_all(files, ["/etc/cron.d"]) == {"/etc/cron.d/x": CRON}


def test_snapshot_chain_reads_the_delta_over_its_parent(trees: dict[str, Path],
                                                        images: Path) -> None:
    chain_dir = images / "chain"
    chain_dir.mkdir()
    base = mkdisk(trees["linux"], chain_dir / "vm.vmdk", "--fs", "ext4")
    child = mkdisk(trees["linux2"], chain_dir / "vm-000001.vmdk", "--fs", "ext4",
                   "--parent", str(base))
    assert child.stat().st_size < base.stat().st_size
    disk = open_local(child)
    assert disk.chain == ("vm-000001.vmdk", "vm.vmdk")
    with DiskFiles.mount([disk]) as files:
        got = read_all(files, ["/etc/cron.d"])
    assert got == {"/etc/cron.d/x": b"changed\n", "/etc/cron.d/y": b"added\n"}
    with DiskFiles.mount([open_local(base)]) as files:
        assert read_all(files, ["/etc/cron.d"]) == {"/etc/cron.d/x": CRON}
    # Without its parent a delta is no disk at all.
    (chain_dir / "vm.vmdk").rename(chain_dir / "moved.vmdk")
    try:
        with pytest.raises(errors.DiskImageError, match=r"vm\.vmdk: cannot open"):
            open_local(child)
    finally:
        (chain_dir / "moved.vmdk").rename(chain_dir / "vm.vmdk")
    # A parent rebuilt after the snapshot has a new content id: the delta no longer fits it.
    mkdisk(trees["linux"], chain_dir / "vm.vmdk", "--fs", "ext4")
    with pytest.raises(errors.DiskImageError, match=r"vm-000001\.vmdk: its parent vm\.vmdk "
                                                    r"changed after the snapshot \(CID "):
        open_local(child)


def test_truncated_vmdk_is_an_error_for_the_whole_disk(trees: dict[str, Path],
                                                        images: Path) -> None:
    path = mkdisk(trees["linux"], images / "cut.vmdk", "--fs", "ext4")
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)
    # Where the cut shows depends on what is read first: opening, mounting or a file's data.
    with (pytest.raises(errors.DiskImageError, match=r"cut\.vmdk: truncated"),
          DiskFiles.mount([open_local(path)]) as files):
        read_all(files, ["/"])


def test_flat_extent_shorter_than_declared_is_truncated(trees: dict[str, Path],
                                                        images: Path) -> None:
    path = mkdisk(trees["linux"], images / "short.vmdk", "--fs", "ext4",
                  "--format", "monolithicFlat")
    flat = images / "short-flat.vmdk"
    with flat.open("r+b") as f:
        f.truncate(flat.stat().st_size - 4096)
    with pytest.raises(errors.DiskImageError, match=r"short-flat\.vmdk: truncated"):
        open_local(path)


def test_not_a_vmdk_is_one_line(images: Path) -> None:
    junk = images / "junk.vmdk"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(errors.DiskImageError, match=r"junk\.vmdk: not a VMDK") as caught:
        open_local(junk)
    assert "\n" not in str(caught.value)


def test_random_bytes_partition_is_an_unknown_file_system(trees: dict[str, Path],
                                                          images: Path) -> None:
    path = mkdisk(trees["linux"], images / "noise.vmdk", "--fs", "ext4", "--table", "mbr",
                  "--format", "monolithicFlat")
    with (images / "noise-flat.vmdk").open("r+b") as f:
        f.seek(1024 * 1024)                              # the partition starts at 1 MiB
        f.write(os.urandom(4 * 1024 * 1024))
    with DiskFiles.mount([open_local(path)]) as files:
        [volume] = files.volumes
        assert (volume.filesystem, volume.mount, volume.problem) == (
            "", "", "unknown file system")
        assert files.problems == (volume,)
        problems: list[tuple[str, str]] = []
        assert read_all(files, ["/"], problems) == {}
        assert problems == [("/", "/: on no volume of these disks")]


def test_luks_volume_is_detected_and_named(trees: dict[str, Path], images: Path) -> None:
    path = mkdisk(trees["linux"], images / "luks.vmdk", "--fs", "ext4", "--luks")
    with DiskFiles.mount([open_local(path)]) as files:
        [volume] = files.volumes
        assert volume.filesystem == "LUKS"
        assert volume.problem == "encrypted volume (LUKS2): contents not readable without its key"
        assert not volume.readable


def test_fstab_mounts_a_second_disk_by_uuid_and_leaves_the_rest_unmounted(
        trees: dict[str, Path], images: Path, tmp_path: Path) -> None:
    data_tree = tmp_path / "data"
    (data_tree / "www").mkdir(parents=True)
    (data_tree / "www" / "index.php").write_bytes(b"<?php evil();\n")
    data = mkdisk(data_tree, images / "data.vmdk", "--fs", "xfs")
    spare = mkdisk(data_tree, images / "spare.vmdk", "--fs", "ext4", "--table", "mbr")
    with DiskFiles.mount([open_local(data)]) as alone:
        uuid = alone.volumes[0].uuid
        assert alone.volumes[0].mount == "/[unmounted]/disk0-p1"
    root_tree = tmp_path / "root"
    shutil.copytree(trees["linux"], root_tree, symlinks=True)
    (root_tree / "etc" / "fstab").write_text(
        f"LABEL=root / ext4 defaults 0 1\nUUID={uuid.upper()} /srv xfs defaults 0 2\n"
        "UUID=0000-gone /mnt/gone ext4 defaults 0 2\nproc /proc proc defaults 0 0\n")
    root = mkdisk(root_tree, images / "root2.vmdk", "--fs", "ext4")
    disks = [open_local(root), open_local(data), open_local(spare)]
    with DiskFiles.mount(disks) as files:
        assert [(v.disk, v.filesystem, v.mount) for v in files.volumes] == [
            (0, "ext4", "/"), (1, "xfs", "/srv"), (2, "ext4", "/[unmounted]/disk2-p1")]
        assert files.notes == ("fstab: UUID=0000-gone on /mnt/gone: not on these disks",)
        got = read_all(files, ["/"])
    assert got["/srv/www/index.php"] == b"<?php evil();\n"
    assert got["/[unmounted]/disk2-p1/www/index.php"] == b"<?php evil();\n"
    assert got["/etc/cron.d/x"] == CRON


def test_one_small_file_from_a_1_gib_disk_reads_a_few_hundred_kib(trees: dict[str, Path],
                                                                  images: Path) -> None:
    path = mkdisk(trees["linux"], images / "big.vmdk", "--fs", "ext4", "--size-mib", "1024")
    files_opened: list[RangeFile] = []
    locals_opened: list[BinaryIO] = []

    def open_range(name: str) -> BinaryIO:
        local = (images / name).open("rb")
        locals_opened.append(local)
        size = local.seek(0, os.SEEK_END)

        def read_range(offset: int, length: int) -> bytes:
            local.seek(offset)
            return local.read(length)

        rf = RangeFile(read_range, size, name=name)
        files_opened.append(rf)
        return rf  # type: ignore[return-value]

    try:
        disk = open_virtual_disk(path.name, open_file=open_range)
        assert disk.size == 1024 * 1024 * 1024
        with DiskFiles.mount([disk]) as files:
            found = list(files.walk(["/etc/cron.d"]))
            with files.open(found[0]) as stream:
                assert b"".join(stream.chunks()) == CRON
    finally:
        for local in locals_opened:
            local.close()
    [rf] = files_opened
    stats = rf.statistics()
    # Metadata read in neighbouring blocks grows a readahead window (RangeFile), and libfsext
    # checks the superblock backups (groups 1, 3, 5 and 7 on 1 GiB, a 64 KiB block each).
    assert stats.bytes_fetched <= 1280 * 1024, stats
    assert stats.calls <= 16, stats


def test_ntfs_alternate_data_streams_are_files_of_their_own(trees: dict[str, Path],
                                                            images: Path,
                                                            tmp_path: Path) -> None:
    path = mkdisk(trees["windows"], images / "ads.vmdk", "--fs", "ntfs", "--table", "none",
                  "--format", "monolithicFlat")
    # ntfs-3g writes a named stream through the user.* extended attribute of the file.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fuse = subprocess.Popen(["ntfs-3g", "-o", "no_detach", str(images / "ads-flat.vmdk"),
                             str(mnt)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.ismount(mnt):
                break
            time.sleep(0.05)
        assert os.path.ismount(mnt), "ntfs-3g did not mount the image"
        os.setxattr(mnt / "Windows" / "Temp" / "x.exe", "user.Zone.Identifier",
                    b"[ZoneTransfer]\r\nZoneId=3\r\n")
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        fuse.wait(timeout=30)
    with DiskFiles.mount([open_local(path)]) as files:
        entries = {f.path: f for f in files.walk(["C:\\Windows\\Temp"])}
        assert set(entries) == {"C:\\Windows\\Temp\\x.exe",
                                "C:\\Windows\\Temp\\x.exe:Zone.Identifier"}
        stream = entries["C:\\Windows\\Temp\\x.exe:Zone.Identifier"]
        assert (stream.stream, stream.size) == ("Zone.Identifier", 26)
        assert stream.file_id == entries["C:\\Windows\\Temp\\x.exe"].file_id
        with files.open(stream) as s:
            assert b"".join(s.chunks()) == b"[ZoneTransfer]\r\nZoneId=3\r\n"


def test_damaged_directory_and_file_are_reported_and_the_walk_goes_on(
        trees: dict[str, Path], images: Path) -> None:
    path = mkdisk(trees["linux"], images / "damaged.vmdk", "--fs", "ext4", "--table", "none",
                  "--format", "monolithicFlat")
    # debugfs zeroes the extent header magic of a directory and of a file in place.
    for target in ("/home/u", "/etc/cron.d/x"):
        subprocess.run(["debugfs", "-w", "-R", f"sif {target} block[0] 0",
                        str(images / "damaged-flat.vmdk")], check=True, capture_output=True)
    with DiskFiles.mount([open_local(path)]) as files:
        problems: list[tuple[str, str]] = []
        entries = {f.path: f for f in files.walk(["/"], on_error=lambda p, e: problems.append(
            (p, str(e))))}
        assert problems == [("/home/u", "/home/u: cannot list: Invalid extent_header magic")]
        assert set(entries) == {"/etc/fstab", "/etc/cron.d/x"}
        with pytest.raises(errors.DiskFileError,
                           match=r"^/etc/cron\.d/x: cannot open: Invalid extent_header magic$"):
            files.open(entries["/etc/cron.d/x"])
        with files.open(entries["/etc/fstab"]) as stream:
            assert b"".join(stream.chunks()).startswith(b"# static")


def test_walk_limits_are_reported_not_silent(trees: dict[str, Path], images: Path) -> None:
    path = mkdisk(trees["linux"], images / "limits.vmdk", "--fs", "ext4")
    shallow = DiskLimits(max_depth=1)
    with DiskFiles.mount([open_local(path)], limits=shallow) as files:
        problems: list[tuple[str, str]] = []
        got = [f.path for f in files.walk(["/"], on_error=lambda p, e: problems.append(
            (p, str(e))))]
        assert sorted(got) == ["/etc/fstab"]
        assert sorted(problems) == [
            ("/etc/cron.d", "/etc/cron.d: deeper than 1 levels: not walked"),
            ("/home/u", "/home/u: deeper than 1 levels: not walked")]
    with DiskFiles.mount([open_local(path)], limits=DiskLimits(max_entries=3)) as files:
        problems = []
        list(files.walk(["/"], on_error=lambda p, e: problems.append((p, str(e)))))
        assert len(problems) == 1
        assert problems[0][1].endswith("more than 3 entries: walk stopped")


def test_files_read_in_another_thread_while_the_walk_goes_on(images: Path,
                                                             tmp_path: Path) -> None:
    tree = tmp_path / "many"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "fstab").write_bytes(b"LABEL=root / ext4 defaults 0 1\n")
    expected: dict[str, bytes] = {"/etc/fstab": b"LABEL=root / ext4 defaults 0 1\n"}
    for d in range(8):
        (tree / f"d{d}").mkdir()
        for n in range(8):
            data = os.urandom(5000 + 997 * n)
            (tree / f"d{d}" / f"f{n}").write_bytes(data)
            expected[f"/d{d}/f{n}"] = data
    path = mkdisk(tree, images / "many.vmdk", "--fs", "ext4", "--format", "streamOptimized")

    def read(files: DiskFiles, f: DiskFile) -> tuple[str, bytes]:
        with files.open(f) as stream:
            return f.path, b"".join(stream.chunks())

    with (DiskFiles.mount([open_local(path)]) as files,
          ThreadPoolExecutor(max_workers=2) as pool):
        futures = [pool.submit(read, files, f) for f in files.walk(["/"])]
        got = dict(future.result() for future in futures)
    assert got == expected


class FailingReads:
    """A local disk image read through small-cached ``RangeFile`` s whose reads raise
    ``error`` while ``failing`` is set (a transport that breaks and comes back)."""

    def __init__(self, path: Path, error: errors.VsphereAvError) -> None:
        self.local = path.open("rb")
        self.size = path.stat().st_size
        self.error = error
        self.failing = False

    def read_range(self, offset: int, length: int) -> bytes:
        if self.failing:
            raise self.error
        self.local.seek(offset)
        return self.local.read(length)

    def open(self, name: str) -> BinaryIO:
        rf = RangeFile(self.read_range, self.size, block_size=4096, cache_blocks=4, name=name)
        return rf  # type: ignore[return-value]

    def close(self) -> None:
        self.local.close()


def test_a_transport_error_passes_through_unchanged(trees: dict[str, Path],
                                                    images: Path) -> None:
    path = mkdisk(trees["linux"], images / "transport.vmdk", "--fs", "ext4")
    reads = FailingReads(path, errors.TransientError("datastore read: connection reset"))
    try:
        disk = open_virtual_disk(path.name, open_file=reads.open)
        with DiskFiles.mount([disk]) as files:
            reads.failing = True    # the walk's reads, not the mount's, meet the failure
            problems: list[tuple[str, str]] = []
            with pytest.raises(errors.TransientError, match="connection reset"):
                read_all(files, ["/"], problems)
            assert problems == []   # not taken for an unreadable directory or file
    finally:
        reads.close()


def esp_tree(base: Path) -> Path:
    esp = base / "esp"
    (esp / "EFI" / "BOOT").mkdir(parents=True)
    (esp / "EFI" / "BOOT" / "BOOTX64.EFI").write_bytes(b"MZ" + BIG[:3000])
    (esp / "EFI" / "debian").mkdir()
    (esp / "EFI" / "debian" / "grubx64.efi").write_bytes(b"MZ grub")
    (esp / "EFI" / "debian" / "Long Name Config.cfg").write_bytes(b"set timeout=5\n")
    return esp


def test_efi_system_partition_files_are_read_where_fstab_mounts_it(
        trees: dict[str, Path], images: Path, tmp_path: Path) -> None:
    tree = tmp_path / "root"
    shutil.copytree(trees["linux"], tree, symlinks=True)
    (tree / "etc" / "fstab").write_text("LABEL=root / ext4 defaults 0 1\n"
                                        "LABEL=EFI /boot/efi vfat umask=0077 0 1\n")
    (tree / "boot" / "efi").mkdir(parents=True)
    path = mkdisk(tree, images / "uefi.vmdk", "--fs", "ext4", "--esp", str(esp_tree(tmp_path)))
    with DiskFiles.mount([open_local(path)]) as files:
        esp, root = files.volumes
        assert (esp.name, esp.filesystem, esp.label, esp.mount, esp.problem, esp.esp) == (
            "p1", "FAT", "EFI", "/boot/efi", "", True)
        assert (root.name, root.filesystem, root.mount, root.esp) == ("p2", "ext4", "/", False)
        assert resolve_spec(f"UUID={esp.uuid.lower()}", files.volumes) == esp  # XXXX-XXXX
        got = read_all(files, ["/"])
        assert {p: v for p, v in got.items() if p.startswith("/boot/efi/")} == {
            "/boot/efi/EFI/BOOT/BOOTX64.EFI": b"MZ" + BIG[:3000],
            "/boot/efi/EFI/debian/grubx64.efi": b"MZ grub",          # 8.3 name, lower case
            "/boot/efi/EFI/debian/Long Name Config.cfg": b"set timeout=5\n"}
        assert got["/etc/cron.d/x"] == CRON
        ids = {f.path: f.file_id for f in files.walk(["/boot/efi"])}
        assert len(set(ids.values())) == 3
        assert ids == {f.path: f.file_id for f in files.walk(["/boot/efi/EFI"])}
        assert all(f.mtime_ns > 0 for f in files.walk(["/boot/efi"]))


def test_windows_efi_system_partition_gets_no_letter_and_is_read(
        trees: dict[str, Path], images: Path, tmp_path: Path) -> None:
    path = mkdisk(trees["windows"], images / "win-uefi.vmdk", "--fs", "ntfs", "--table", "mbr",
                  "--esp", str(esp_tree(tmp_path)))
    with DiskFiles.mount([open_local(path)]) as files:
        assert files.windows
        esp, system = files.volumes
        assert (esp.filesystem, esp.mount, esp.esp) == ("FAT", "[unmounted]\\disk0-p1", True)
        assert (system.filesystem, system.mount) == ("ntfs", "C:")
        got = read_all(files)
        assert got["[unmounted]\\disk0-p1\\EFI\\BOOT\\BOOTX64.EFI"] == b"MZ" + BIG[:3000]
        assert got["C:\\Windows\\Temp\\x.exe"] == b"MZ" + BIG[:5000]
        assert len(got) == 5


def test_damaged_fat_is_a_volume_problem_and_the_rest_is_read(
        trees: dict[str, Path], images: Path, tmp_path: Path) -> None:
    path = mkdisk(trees["linux"], images / "badesp.vmdk", "--fs", "ext4", "--format",
                  "monolithicFlat", "--esp", str(esp_tree(tmp_path)))
    with (images / "badesp-flat.vmdk").open("r+b") as f:
        f.seek(1024 * 1024 + 11)                  # the ESP's BPB: bytes per sector, ...
        f.write(b"\x00" * 25)
    with DiskFiles.mount([open_local(path)]) as files:
        esp, root = files.volumes
        assert (root.filesystem, root.mount, root.problem) == ("ext4", "/", "")
        assert esp.filesystem == "FAT"
        assert esp.problem.startswith("damaged FAT file system: ")
        assert files.problems == (esp,)
        assert read_all(files, ["/etc/cron.d"]) == {"/etc/cron.d/x": CRON}


MTIME_S = 1_614_834_367            # 2021-03-04 05:06:07 UTC


def ext_vmdk(tree: Path, path: Path, *mke2fs: str, debugfs: str = "") -> Path:
    """An ext file system over a whole disk made with mke2fs options mkdisk.sh does not
    give (ext2, ext3, features), changed by one debugfs request, then made a VMDK."""
    raw = path.with_suffix(".raw")
    with raw.open("wb") as f:
        f.truncate(32 * 1024 * 1024)
    subprocess.run(["mke2fs", "-q", "-F", "-b", "4096", "-L", "root", *mke2fs, "-d", str(tree),
                    str(raw)], check=True, capture_output=True)
    if debugfs:
        subprocess.run(["debugfs", "-w", "-R", debugfs, str(raw)], check=True,
                       capture_output=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(raw), str(path)],
                   check=True, capture_output=True)
    raw.unlink()
    return path


@pytest.mark.parametrize(("fs", "mtime_extra", "expected_ns"), [
    ("ext2", None, MTIME_S * 10**9),               # 128-byte inodes: whole seconds only
    ("ext3", None, MTIME_S * 10**9),
    ("ext4", 123_456_789 << 2, MTIME_S * 10**9 + 123_456_789),
    ("ext4", (123_456_789 << 2) | 1, (MTIME_S + 2**32) * 10**9 + 123_456_789),  # 2157
])
def test_ext_mtimes_are_nanoseconds_since_1970(images: Path, tmp_path: Path, fs: str,
                                               mtime_extra: int | None,
                                               expected_ns: int) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "fstab").write_bytes(b"LABEL=root / ext4 defaults 0 1\n")
    os.utime(tree / "etc" / "fstab", ns=(MTIME_S * 10**9, MTIME_S * 10**9))
    # mke2fs -d keeps whole seconds; the extra field holds ns << 2 and two more bits of seconds
    path = ext_vmdk(tree, images / f"{fs}-mtime-{mtime_extra}.vmdk", "-t", fs, "-I",
                    "128" if mtime_extra is None else "256", debugfs=(
                        f"sif /etc/fstab mtime_extra {mtime_extra}" if mtime_extra else ""))
    with DiskFiles.mount([open_local(path)]) as files:
        [volume] = files.volumes
        assert (volume.filesystem, volume.mount, volume.problem) == (fs, "/", "")
        [f] = files.walk(["/"])
        assert (f.path, f.mtime_ns) == ("/etc/fstab", expected_ns)
        with files.open(f) as stream:
            assert b"".join(stream.chunks()) == b"LABEL=root / ext4 defaults 0 1\n"


@pytest.mark.parametrize(("fs", "library"), [("ext4", "pyfsext"), ("xfs", "pyfsxfs")])
def test_an_outage_inside_the_file_system_library_stays_an_outage(
        trees: dict[str, Path], images: Path, fs: str, library: str) -> None:
    path = mkdisk(trees["linux"], images / f"outage-{fs}.vmdk", "--fs", fs)
    reads = FailingReads(path, errors.ConnectionLost("datastore read: host unreachable"))
    try:
        disk = open_virtual_disk(path.name, open_file=reads.open)
        with DiskFiles.mount([disk]) as files:
            problems: list[tuple[str, str]] = []
            entries = {f.path: f for f in files.walk(["/"], on_error=lambda p, e: problems.append(
                (p, str(e))))}
            stream = files.open(entries["/home/u/big.bin"])
            reads.failing = True    # the file's data is read by the C library
            with pytest.raises(errors.ConnectionLost, match="host unreachable") as caught:
                b"".join(stream.chunks())
            # It crossed the library, which raised an IOError of its own in its place.
            assert str(caught.value.__context__).startswith(f"{library}_file_entry_read")
            assert problems == []
            reads.failing = False   # the connection is back: the same stream reads again
            assert b"".join(stream.chunks()) == BIG
    finally:
        reads.close()


def test_a_disk_cut_short_under_the_library_still_names_itself(trees: dict[str, Path],
                                                               images: Path) -> None:
    path = mkdisk(trees["linux"], images / "cutlater.vmdk", "--fs", "ext4", "--table", "none",
                  "--format", "monolithicFlat")
    flat = images / "cutlater-flat.vmdk"
    first = subprocess.run(["debugfs", "-R", "bmap /home/u/big.bin 0", str(flat)], check=True,
                           capture_output=True, text=True).stdout
    with DiskFiles.mount([open_local(path)]) as files:
        entries = {f.path: f for f in files.walk(["/"])}
        stream = files.open(entries["/home/u/big.bin"])
        os.truncate(flat, int(first) * 4096)        # cut where the file's data begins
        with pytest.raises(errors.DiskImageError,
                           match=r"^cutlater-flat\.vmdk: truncated") as caught:
            b"".join(stream.chunks())
        assert str(caught.value.__context__).startswith("pyfsext_file_entry_read")


def test_ext4_whose_root_cannot_be_listed_is_a_damaged_volume(trees: dict[str, Path],
                                                             images: Path) -> None:
    path = mkdisk(trees["linux"], images / "badroot.vmdk", "--fs", "ext4", "--table", "none",
                  "--format", "monolithicFlat")
    subprocess.run(["debugfs", "-w", "-R", "sif / block[0] 0",
                    str(images / "badroot-flat.vmdk")], check=True, capture_output=True)
    with DiskFiles.mount([open_local(path)]) as files:
        [volume] = files.volumes
        assert volume.filesystem == "ext4"
        assert volume.problem.startswith("damaged ext4 file system: ")
        assert "\n" not in volume.problem
        assert files.problems == (volume,)


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_a_name_that_is_not_utf8_is_read_as_its_bytes(images: Path, tmp_path: Path,
                                                     fs: str) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "fstab").write_bytes(b"LABEL=root / ext4 defaults 0 1\n")
    (tree / "etc" / os.fsdecode(b"bad\xff.sh")).write_bytes(b"evil\n")
    (tree / "etc" / "z").write_bytes(b"after\n")
    path = mkdisk(tree, images / f"names-{fs}.vmdk", "--fs", fs)
    with DiskFiles.mount([open_local(path)]) as files:
        assert read_all(files, ["/"]) == {"/etc/fstab": b"LABEL=root / ext4 defaults 0 1\n",
                                          "/etc/bad\udcff.sh": b"evil\n", "/etc/z": b"after\n"}


def test_xfs_mtimes_are_nanoseconds_since_1970(images: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "fstab").write_bytes(b"LABEL=root / xfs defaults 0 1\n")
    mtime_ns = MTIME_S * 10**9 + 123_456_789
    os.utime(tree / "etc" / "fstab", ns=(mtime_ns, mtime_ns))      # cp -a keeps them
    path = mkdisk(tree, images / "xfs-mtime.vmdk", "--fs", "xfs")
    with DiskFiles.mount([open_local(path)]) as files:
        [f] = files.walk(["/"])
        assert (f.path, f.mtime_ns) == ("/etc/fstab", mtime_ns)


@pytest.mark.parametrize("feature", [
    "large_dir", "stable_inodes",     # libfsext refuses the volume: dissect reads it
    "inline_data",                    # dissect finds no inline directory: libfsext reads it
])
def test_ext4_features_one_of_the_libraries_reads(trees: dict[str, Path], images: Path,
                                                  feature: str) -> None:
    path = ext_vmdk(trees["linux"], images / f"feature-{feature}.vmdk", "-t", "ext4", "-O",
                    feature)
    with DiskFiles.mount([open_local(path)]) as files:
        [volume] = files.volumes
        assert (volume.filesystem, volume.mount, volume.label, volume.problem) == (
            "ext4", "/", "root", "")
        got = read_all(files, ["/"])
        assert {p: got[p] for p in LINUX_FILES} == LINUX_FILES
        assert all(f.mtime_ns > 0 for f in files.walk(["/"]))


def test_an_outage_while_the_library_opens_the_volume_is_no_damaged_volume(
        trees: dict[str, Path], images: Path) -> None:
    path = mkdisk(trees["linux"], images / "openfail.vmdk", "--fs", "ext4", "--size-mib", "300",
                  "--format", "monolithicFlat")
    flat = images / "openfail-flat.vmdk"
    # Only libfsext reads group 1's superblock backup (128 MiB into the volume, which
    # starts at 1 MiB): dissect reads none, so this read fails inside the C library alone.
    backup = (1 + 128) * 1024 * 1024
    local = flat.open("rb")

    def read_range(offset: int, length: int) -> bytes:
        if offset < backup + 4096 and backup < offset + length:
            raise errors.ConnectionLost("datastore read: host unreachable")
        local.seek(offset)
        return local.read(length)

    def open_file(name: str) -> BinaryIO:
        if name != flat.name:
            return (images / name).open("rb")
        rf = RangeFile(read_range, flat.stat().st_size, block_size=4096, cache_blocks=4,
                       name=name)
        return rf  # type: ignore[return-value]

    try:
        with pytest.raises(errors.ConnectionLost, match="host unreachable") as caught:
            DiskFiles.mount([open_virtual_disk(path.name, open_file=open_file)])
        assert str(caught.value.__context__).startswith("pyfsext_volume_open")
    finally:
        local.close()
