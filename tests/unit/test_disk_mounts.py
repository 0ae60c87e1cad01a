"""The disk source's guest mount table: fstab parsing, device specs, drive letters (pure)."""

from __future__ import annotations

import pytest

from vsphere_av.scan.sources.diskimage import (
    FstabEntry,
    Volume,
    parse_fstab,
    plan_mounts,
    resolve_spec,
)

VOLUMES = [
    Volume(index=0, disk=0, name="p1", kind="partition", size=1, filesystem="ext4",
           label="boot", uuid="1111-aaaa", partition_uuid="pp-1", partition_name="esp",
           partition_number=1),
    Volume(index=1, disk=0, name="p2", kind="partition", size=1, filesystem="LVM2_member",
           partition_number=2),
    Volume(index=2, disk=0, name="vg-sys/lv-root", kind="logical volume", size=1,
           filesystem="xfs", uuid="2222-bbbb"),
    Volume(index=3, disk=1, name="p1", kind="partition", size=1, filesystem="ext4",
           label="data", uuid="3333-cccc", partition_number=1),
    Volume(index=4, disk=1, name="p2", kind="partition", size=1, filesystem="",
           partition_number=2, problem="unknown file system"),
]


def test_parse_fstab_keeps_block_mounts_only() -> None:
    text = """# comment
    UUID=1111-aaaa  /boot  ext4 defaults 0 2
    LABEL=my\\040data /srv/my\\040data ext4 defaults 0 2   # trailing comment
    /dev/sda2 none swap sw 0 0
    proc /proc proc defaults 0 0
    server:/export /mnt/nfs nfs defaults 0 0
    /srv/a /srv/b none bind 0 0
    tmpfs /tmp tmpfs defaults 0 0
    broken-line
    """
    assert parse_fstab(text) == [
        FstabEntry(spec="UUID=1111-aaaa", mount="/boot", fstype="ext4"),
        FstabEntry(spec="LABEL=my data", mount="/srv/my data", fstype="ext4"),
    ]


@pytest.mark.parametrize(("spec", "index"), [
    ("UUID=1111-AAAA", 0),
    ("/dev/disk/by-uuid/3333-cccc", 3),
    ("LABEL=data", 3),
    ("LABEL=DATA", None),                     # labels are case-sensitive
    ("PARTUUID=PP-1", 0),
    ("PARTLABEL=esp", 0),
    ("/dev/mapper/vg--sys-lv--root", 2),
    ("/dev/vg-sys/lv-root", 2),
    ("/dev/sda1", 0),
    ("/dev/vdb1", 3),
    ("/dev/sdc1", None),
    ("UUID=9999", None),
    ("/dev/nonsense", None),
])
def test_resolve_spec(spec: str, index: int | None) -> None:
    found = resolve_spec(spec, VOLUMES)
    assert (found.index if found else None) == index


def test_linux_mounts_follow_fstab_and_the_rest_is_unmounted() -> None:
    fstab = [FstabEntry(spec="UUID=2222-bbbb", mount="/", fstype="xfs"),
             FstabEntry(spec="LABEL=boot", mount="/boot", fstype="ext4"),
             FstabEntry(spec="UUID=0000", mount="/gone", fstype="ext4"),
             FstabEntry(spec="LABEL=boot", mount="/again", fstype="ext4")]
    mounts, notes = plan_mounts(VOLUMES, root=2, fstab=fstab, windows=False, system=None)
    assert mounts == {2: "/", 0: "/boot", 3: "/[unmounted]/disk1-p1"}
    assert notes == ["fstab: UUID=0000 on /gone: not on these disks",
                     "fstab: LABEL=boot on /again: already mounted on /boot"]


def test_linux_without_a_root_puts_every_readable_volume_under_the_pseudo_root() -> None:
    mounts, _ = plan_mounts(VOLUMES, root=None, fstab=[], windows=False, system=None)
    assert mounts == {0: "/[unmounted]/disk0-p1", 2: "/[unmounted]/disk0-vg-sys-lv-root",
                      3: "/[unmounted]/disk1-p1"}


@pytest.mark.parametrize(("system", "expected"), [
    (3, {3: "C:", 0: "D:", 2: "E:"}),
    (None, {0: "D:", 2: "E:", 3: "F:"}),    # no \Windows found: C: is not guessed
])
def test_windows_letters(system: int | None, expected: dict[int, str]) -> None:
    mounts, notes = plan_mounts(VOLUMES, root=None, fstab=[], windows=True, system=system)
    assert mounts == expected
    assert notes == []


ESP = Volume(index=5, disk=0, name="p3", kind="partition", size=1, filesystem="FAT",
             label="EFI", uuid="ABCD-1234", partition_type="EFI System partition",
             partition_number=3)


def test_the_efi_system_partition_gets_no_drive_letter_on_windows() -> None:
    data = Volume(index=6, disk=0, name="p4", kind="partition", size=1, filesystem="FAT",
                  partition_type="Microsoft basic data", partition_number=4)
    mounts, _ = plan_mounts([*VOLUMES, ESP, data], root=None, fstab=[], windows=True,
                            system=3)
    assert mounts == {3: "C:", 0: "D:", 2: "E:", 5: "[unmounted]\\disk0-p3", 6: "F:"}
    assert ESP.esp
    assert not data.esp


def test_the_efi_system_partition_is_mounted_where_fstab_says_by_its_fat_serial() -> None:
    fstab = parse_fstab("UUID=2222-bbbb / xfs defaults 0 1\n"
                        "UUID=abcd-1234 /boot/efi vfat umask=0077 0 1\n")
    mounts, notes = plan_mounts([*VOLUMES, ESP], root=2, fstab=fstab, windows=False,
                                system=None)
    assert mounts[5] == "/boot/efi"
    assert notes == []
