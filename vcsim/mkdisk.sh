#!/bin/bash
# mkdisk.sh: build a real VMDK from a directory tree with Debian's tools (no shortcuts).
#
#   mkdisk.sh --src DIR --out PATH.vmdk --fs ext4|ntfs|xfs [--table gpt|mbr|none] [--lvm]
#             [--luks] [--format monolithicSparse|monolithicFlat|streamOptimized]
#             [--size-mib N] [--parent PARENT.vmdk] [--esp DIR]
#
# Layout of the raw disk before conversion (sizes in MiB, all offsets 1 MiB aligned):
#   gpt / mbr: one partition from 1 MiB to 1 MiB before the end (GPT keeps its backup
#              header there); type Linux filesystem / Microsoft basic data / Linux LVM.
#   none:      the volume starts at byte 0 of the disk.
#   --esp DIR: (gpt or mbr) an EFI system partition comes first, from 1 MiB: FAT32 (mkfs.vfat,
#              label EFI, 512-byte clusters) holding DIR's tree (mcopy); the partition above
#              follows it. At least 40 MiB (FAT32 needs 65,525 clusters).
#   --lvm:     the partition (or disk) is an LVM2 PV (pe_start 1 MiB, extent 1 MiB) of VG
#              "vg0" holding one linear LV "root" over all of it; the file system sits in
#              the LV. Written with lvm2 on a loop device, never activated (no
#              device-mapper needed): the LV's bytes are the PV's bytes after pe_start.
#   --luks:    the volume (partition or LV) carries a LUKS2 header instead of a file system
#              (the tree is not written: enough for a reader to detect and name it).
# File systems: ext4 with mke2fs -d (no mount); ntfs with mkntfs and ntfs-3g (FUSE mount of
# the image file, cp keeping mtimes and symlinks); xfs with mkfs.xfs and a loop mount.
# Conversion: qemu-img convert -O vmdk -o subformat=... (monolithicFlat writes PATH.vmdk and
# PATH-flat.vmdk). --parent: a monolithicSparse delta holding only the clusters that differ
# from PARENT (qemu-img convert -B; the descriptor names the parent in parentFileNameHint,
# relative when it sits in the same directory, and parentCID); the disk keeps PARENT's size
# and the same layout options must be given.
# Success prints nothing; an error prints one line on stderr and exits non-zero, leaving no
# temporary files, mounts or loop devices behind.
set -u -o pipefail

die() { echo "mkdisk: $*" >&2; exit 1; }

src="" out="" fs="" table=gpt lvm=0 luks=0 format=monolithicSparse size_mib="" parent="" esp=""
while [ $# -gt 0 ]; do
  case "$1" in
    --src) src="${2-}"; shift 2 || die "--src needs a value" ;;
    --out) out="${2-}"; shift 2 || die "--out needs a value" ;;
    --fs) fs="${2-}"; shift 2 || die "--fs needs a value" ;;
    --table) table="${2-}"; shift 2 || die "--table needs a value" ;;
    --lvm) lvm=1; shift ;;
    --luks) luks=1; shift ;;
    --format) format="${2-}"; shift 2 || die "--format needs a value" ;;
    --size-mib) size_mib="${2-}"; shift 2 || die "--size-mib needs a value" ;;
    --parent) parent="${2-}"; shift 2 || die "--parent needs a value" ;;
    --esp) esp="${2-}"; shift 2 || die "--esp needs a value" ;;
    *) die "unknown argument: $1" ;;
  esac
done

[ -n "$src" ] || die "--src DIR is required"
[ -d "$src" ] || die "not a directory: $src"
[ -n "$out" ] || die "--out PATH.vmdk is required"
case "$out" in *.vmdk) ;; *) die "--out must end in .vmdk: $out" ;; esac
case "$fs" in ext4|ntfs|xfs) ;; *) die "--fs must be ext4, ntfs or xfs" ;; esac
case "$table" in gpt|mbr|none) ;; *) die "--table must be gpt, mbr or none" ;; esac
case "$format" in monolithicSparse|monolithicFlat|streamOptimized) ;;
  *) die "--format must be monolithicSparse, monolithicFlat or streamOptimized" ;; esac
if [ -n "$size_mib" ]; then
  [[ "$size_mib" =~ ^[1-9][0-9]*$ ]] || die "--size-mib must be a positive integer"
fi
esp_mib=0
if [ -n "$esp" ]; then
  [ -d "$esp" ] || die "not a directory: $esp"
  [ "$table" != none ] || die "--esp needs a partition table (gpt or mbr)"
  esp=$(cd -- "$esp" && pwd -P)
  esp_bytes=$(du -s -B1 --apparent-size -- "$esp" 2>/dev/null | cut -f1) || die "cannot read $esp"
  esp_mib=$(( (esp_bytes + esp_bytes / 4 + $(find "$esp" | wc -l) * 4096) / 1048576 + 8 ))
  [ "$esp_mib" -ge 40 ] || esp_mib=40
fi
outdir=$(dirname -- "$out")
[ -d "$outdir" ] || die "output directory does not exist: $outdir"
outdir=$(cd -- "$outdir" && pwd -P)
outbase=$(basename -- "$out")
out="$outdir/$outbase"
if [ -n "$parent" ]; then
  [ -f "$parent" ] || die "parent disk not found: $parent"
  [ "$format" = monolithicSparse ] || die "--parent writes a monolithicSparse delta only"
  [ -z "$size_mib" ] || die "--size-mib cannot be given with --parent (the delta keeps the parent's size)"
  parent=$(cd -- "$(dirname -- "$parent")" && pwd -P)/$(basename -- "$parent")
  [ "$parent" != "$out" ] || die "--parent and --out are the same file"
fi

src=$(cd -- "$src" && pwd -P)

# Identifiers (GPT/MBR disk and partition ids, file system UUIDs, LVM PV UUID) derive from
# the disk's name without its -00000N delta suffix, so a disk keeps them across rebuilds and
# snapshots (as a real disk does) and a delta does not differ from its parent just for them.
seed=$(printf '%s' "$outdir/${outbase%.vmdk}" | sed 's/-[0-9]\{6\}$//' | sha256sum | cut -c1-64)
seed2=$(printf '%s' "$seed" | sha256sum | cut -c1-64)
hex="$seed$seed2"
uuid_at() {  # uuid_at N: a version-4 style UUID from hex digits N..N+31
  local h=${hex:$1:32}
  printf '%s-%s-4%s-a%s-%s' "${h:0:8}" "${h:8:4}" "${h:13:3}" "${h:17:3}" "${h:20:12}"
}
lvm_uuid() {  # 32 characters from LVM's alphabet in its 6-4-4-4-4-4-6 groups
  local alphabet=abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 out="" i
  for i in $(seq 0 31); do out+=${alphabet:$(( 16#${hex:$(( 64 + i * 2 )):2} % 62 )):1}; done
  printf '%s-%s-%s-%s-%s-%s-%s' "${out:0:6}" "${out:6:4}" "${out:10:4}" "${out:14:4}" "${out:18:4}" "${out:22:4}" "${out:26:6}"
}
tmp=""
loopdev=""
mnt=""
fusepid=""
tmpout=""
cleanup() {
  if [ -n "$mnt" ] && mountpoint -q "$mnt" 2>/dev/null; then umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null; fi
  if [ -n "$fusepid" ]; then wait "$fusepid" 2>/dev/null; fi
  if [ -n "$loopdev" ]; then losetup -d "$loopdev" 2>/dev/null; fi
  [ -z "$tmpout" ] || rm -f -- "$tmpout"
  [ -z "$tmp" ] || rm -rf -- "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

tmp=$(mktemp -d "${TMPDIR:-/tmp}/mkdisk.XXXXXX") || die "cannot create a temporary directory"

# run CMD...: run quietly; on failure die with the command's last stderr line.
run() {
  local err
  if ! err=$("$@" 2>&1 >/dev/null); then
    err=$(printf '%s\n' "$err" | grep -v '^[[:space:]]*$' | tail -n 1)
    local name=$1; [ "$name" != env ] || name=lvm
    die "$name failed: ${err:-exit status non-zero}"
  fi
}

MiB=1048576
# Size of the volume that holds the file system, in MiB.
if [ -n "$parent" ]; then
  vsize=$(qemu-img info --output=json "$parent" 2>/dev/null | sed -n 's/.*"virtual-size": *\([0-9]*\).*/\1/p' | head -n 1)
  [ -n "$vsize" ] || die "cannot read the parent disk: $parent"
  disk_mib=$(( vsize / MiB ))
else
  bytes=$(du -s -B1 --apparent-size -- "$src" 2>/dev/null | cut -f1) || die "cannot read $src"
  nfiles=$(find "$src" 2>/dev/null | wc -l)
  case "$fs" in
    ext4) need=$(( bytes + bytes / 4 + nfiles * 8192 + 16 * MiB )) ;;
    ntfs) need=$(( bytes + bytes / 4 + nfiles * 8192 + 24 * MiB )) ;;
    xfs)  need=$(( bytes + bytes / 4 + nfiles * 8192 + 300 * MiB )) ;;  # mkfs.xfs minimum: 300 MB
  esac
  need_mib=$(( (need + MiB - 1) / MiB ))
  [ "$table" = none ] || need_mib=$(( need_mib + 2 ))
  [ "$lvm" = 0 ] || need_mib=$(( need_mib + 4 ))
  if [ -n "$size_mib" ]; then
    [ "$size_mib" -ge "$need_mib" ] || die "--size-mib $size_mib is too small for $src (needs $need_mib)"
    disk_mib=$size_mib
  else
    disk_mib=$need_mib
  fi
fi
[ "$disk_mib" -ge 4 ] || die "disk too small: $disk_mib MiB"
[ -n "$parent" ] || disk_mib=$(( disk_mib + esp_mib ))

raw="$tmp/disk.raw"
truncate -s "$(( disk_mib * MiB ))" "$raw" || die "cannot create $raw"

# Partition table.
if [ "$table" = none ]; then
  part_off=0
  part_mib=$disk_mib
else
  part_off=$(( (1 + esp_mib) * MiB ))
  part_mib=$(( disk_mib - 2 - esp_mib ))
  [ "$part_mib" -ge 2 ] || die "disk too small for a partition table: $disk_mib MiB"
  if [ "$table" = gpt ]; then
    if [ "$lvm" = 1 ]; then ptype=E6D6D379-F507-44C2-A23C-238F2A3DF928
    elif [ "$fs" = ntfs ]; then ptype=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7
    else ptype=0FC63DAF-8483-4772-8E79-3D69D8477DE4; fi
    printf 'label: gpt\nlabel-id: %s\n' "$(uuid_at 0)" > "$tmp/table"
    [ "$esp_mib" = 0 ] || printf 'start=2048, size=%d, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=%s\n' \
      "$(( esp_mib * 2048 ))" "$(uuid_at 16)" >> "$tmp/table"
    printf 'start=%d, size=%d, type=%s, uuid=%s\n' \
      "$(( part_off / 512 ))" "$(( part_mib * 2048 ))" "$ptype" "$(uuid_at 32)" >> "$tmp/table"
  else
    if [ "$lvm" = 1 ]; then ptype=8e; elif [ "$fs" = ntfs ]; then ptype=7; else ptype=83; fi
    printf 'label: dos\nlabel-id: 0x%s\n' "${hex:0:8}" > "$tmp/table"
    [ "$esp_mib" = 0 ] || printf 'start=2048, size=%d, type=ef\n' "$(( esp_mib * 2048 ))" >> "$tmp/table"
    printf 'start=%d, size=%d, type=%s\n' "$(( part_off / 512 ))" "$(( part_mib * 2048 ))" "$ptype" >> "$tmp/table"
  fi
  run sfdisk --no-reread --no-tell-kernel -q "$raw" < "$tmp/table"
fi

# LVM2: PV over the partition, VG vg0, LV root over every extent, never activated.
vol_off=$part_off
vol_mib=$part_mib
if [ "$lvm" = 1 ]; then
  pv="$tmp/pv.raw"
  truncate -s "$(( part_mib * MiB ))" "$pv" || die "cannot create $pv"
  # Another build may take the free loop device between the lookup and the attach: retry.
  for attempt in 1 2 3 4 5; do
    loopdev=$(losetup -f --show "$pv" 2>/dev/null) && break
    loopdev=""
    sleep "0.$attempt"
  done
  [ -n "$loopdev" ] || die "cannot attach a loop device for LVM"
  lvmconf='devices { obtain_device_list_from_udev=0 scan_lvs=0 use_devicesfile=0 } activation { udev_sync=0 udev_rules=0 monitoring=0 } backup { backup=0 archive=0 }'
  # --driverloaded n: lvm2 writes metadata only, never asks the kernel's device-mapper
  # (there may be none); --devices: it sees this loop device and nothing else on the host.
  lvmenv=(env LVM_SUPPRESS_FD_WARNINGS=1 lvm)
  run "${lvmenv[@]}" pvcreate --driverloaded n --config "$lvmconf" --devices "$loopdev" -q --dataalignment 1m --uuid "$(lvm_uuid)" --norestorefile "$loopdev"
  run "${lvmenv[@]}" vgcreate --driverloaded n --config "$lvmconf" --devices "$loopdev" -q -s 1m vg0 "$loopdev"
  run "${lvmenv[@]}" lvcreate --driverloaded n --config "$lvmconf" --devices "$loopdev" -q -an -Zn -y -l 100%FREE -n root vg0
  pe_start=$("${lvmenv[@]}" pvs --driverloaded n --config "$lvmconf" --devices "$loopdev" --noheadings --units b --nosuffix -o pe_start "$loopdev" 2>/dev/null | tr -d ' ')
  lv_bytes=$("${lvmenv[@]}" lvs --driverloaded n --config "$lvmconf" --devices "$loopdev" --noheadings --units b --nosuffix -o lv_size vg0/root 2>/dev/null | tr -d ' ')
  [[ "$pe_start" =~ ^[0-9]+$ && "$lv_bytes" =~ ^[0-9]+$ ]] || die "cannot read the LVM layout"
  losetup -d "$loopdev" 2>/dev/null || die "cannot detach $loopdev"
  loopdev=""
  run dd if="$pv" of="$raw" bs=1M seek="$(( part_off / MiB ))" conv=notrunc,sparse status=none
  rm -f -- "$pv"
  vol_off=$(( part_off + pe_start ))
  vol_mib=$(( lv_bytes / MiB ))
fi

# The volume's contents: a LUKS2 header, or a file system holding the tree.
vol="$tmp/vol.raw"
truncate -s "$(( vol_mib * MiB ))" "$vol" || die "cannot create $vol"
if [ "$luks" = 1 ]; then
  head -c 32 /dev/urandom > "$tmp/key"
  run cryptsetup luksFormat -q --batch-mode --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --key-file "$tmp/key" "$vol"
else
  case "$fs" in
    ext4)
      run mke2fs -q -F -t ext4 -b 4096 -L root -U "$(uuid_at 64)" -E "hash_seed=$(uuid_at 96)" -d "$src" "$vol"
      ;;
    ntfs)
      run mkntfs -q -F -f -L Windows -p "$(( vol_off / 512 ))" -H 255 -S 63 "$vol"
      run ntfslabel --new-serial="${hex:64:16}" "$vol" Windows
      mnt="$tmp/mnt"; mkdir "$mnt"
      ntfs-3g -o no_detach,windows_names "$vol" "$mnt" >"$tmp/ntfs-3g.log" 2>&1 &
      fusepid=$!
      for _ in $(seq 1 100); do mountpoint -q "$mnt" && break; kill -0 "$fusepid" 2>/dev/null || break; sleep 0.05; done
      mountpoint -q "$mnt" || die "ntfs-3g could not mount the image: $(grep -v '^$' "$tmp/ntfs-3g.log" | tail -n 1)"
      run cp -R -P --preserve=timestamps,links -T -- "$src" "$mnt"
      run umount "$mnt"
      wait "$fusepid" || die "ntfs-3g failed while writing the image"
      fusepid=""; mnt=""
      ;;
    xfs)
      run mkfs.xfs -q -f -L root -m uuid="$(uuid_at 64)" "$vol"
      mnt="$tmp/mnt"; mkdir "$mnt"
      run mount -o loop "$vol" "$mnt"
      run cp -a -T -- "$src" "$mnt"
      run umount "$mnt"
      mnt=""
      ;;
  esac
fi
run dd if="$vol" of="$raw" bs=1M seek="$(( vol_off / MiB ))" conv=notrunc,sparse status=none
rm -f -- "$vol"

# The EFI system partition: FAT32 holding the --esp tree (mtools: no mount).
if [ "$esp_mib" != 0 ]; then
  espvol="$tmp/esp.raw"
  truncate -s "$(( esp_mib * MiB ))" "$espvol" || die "cannot create $espvol"
  run mkfs.vfat -F 32 -s 1 -n EFI -i "${hex:48:8}" -h 2048 "$espvol"
  if [ -n "$(ls -A -- "$esp")" ]; then
    run env MTOOLS_SKIP_CHECK=1 mcopy -s -p -m -i "$espvol" "$esp"/* ::/
  fi
  run dd if="$espvol" of="$raw" bs=1M seek=1 conv=notrunc,sparse status=none
  rm -f -- "$espvol"
fi

# VMDK.
if [ -n "$parent" ]; then
  if [ "$(dirname -- "$parent")" = "$outdir" ]; then hint=$(basename -- "$parent"); else hint=$parent; fi
  tmpout="$outdir/.${outbase%.vmdk}.mkdisk$$.vmdk"
  # qemu-img convert -B alone writes every cluster of the source. So first an overlay on the
  # new raw disk is rebased onto the parent (safe mode compares both, cluster by cluster, and
  # keeps only those that differ); converting it with -B then copies just those.
  run qemu-img create -q -f qcow2 -b "$raw" -F raw "$tmp/delta.qcow2"
  run qemu-img rebase -q -b "$parent" -F vmdk "$tmp/delta.qcow2"
  # The hint is resolved relative to the new image's directory, which is outdir.
  run qemu-img convert -q -f qcow2 -O vmdk -o subformat=monolithicSparse,adapter_type=lsilogic \
    -B "$hint" -F vmdk "$tmp/delta.qcow2" "$tmpout"
  mv -f -- "$tmpout" "$out" || die "cannot write $out"
  tmpout=""
else
  mkdir "$tmp/vmdk"
  run qemu-img convert -q -f raw -O vmdk -o "subformat=$format,adapter_type=lsilogic" "$raw" "$tmp/vmdk/$outbase"
  if [ "$format" = monolithicFlat ]; then
    flat="${outbase%.vmdk}-flat.vmdk"
    [ -f "$tmp/vmdk/$flat" ] || die "qemu-img wrote no $flat"
    mv -f -- "$tmp/vmdk/$flat" "$outdir/$flat" || die "cannot write $outdir/$flat"
  fi
  mv -f -- "$tmp/vmdk/$outbase" "$out" || die "cannot write $out"
fi
exit 0
