#!/usr/bin/env bash
# Builds the vsphere-av security appliance (issue 13) from this checkout with Debian's tools
# only, as root, without mounting anything (no loop devices, no systemd-nspawn):
#
#   debootstrap (Debian 12 minbase, from the apt sources this machine is configured with)
#   -> chroot: account, venv with vsphere-av from a wheel built from this checkout (its
#      dependencies as binary wheels: no compiler ever enters the image), overlay files
#      (appliance/rootfs), services enabled, host keys and machine-id removed
#   -> ext4 file systems made from directories (mke2fs -d): / (mounted read-only) and /var
#   -> an EFI system partition made with mkfs.vfat -C + mtools holding Debian's signed shim
#      and GRUB (so the VM boots with EFI secure boot, as the controller deploys it)
#   -> a GPT disk (sfdisk) -> streamOptimized VMDK (qemu-img) -> OVF + manifest -> OVA (tar).
#
# Usage: appliance/build.sh OUT_DIR PYTHON   (PYTHON: a venv python with pip, for the wheels)
set -euo pipefail

OUT=$(realpath -m "${1:?output directory}")
PY=${2:?python with pip}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
WORK=$OUT/work
SUITE=bookworm
start=$(date +%s)
step() { echo "== $* ($(( $(date +%s) - start )) s)"; }

[ "$(id -u)" = 0 ] || { echo "appliance/build.sh must run as root (debootstrap, chroot)" >&2; exit 1; }
for tool in debootstrap mke2fs sfdisk mkfs.vfat mcopy qemu-img; do
  command -v "$tool" >/dev/null || { echo "missing $tool (make appliance installs it)" >&2; exit 1; }
done

# Debian's archive as this machine's apt is configured (deb822 or one-line sources).
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $3 ~ /^bookworm$/ {print $2; exit}' \
                               /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
[ -n "$mirror" ] || { echo "no Debian archive found in /etc/apt sources" >&2; exit 1; }

PACKAGES=systemd,systemd-sysv,udev,kmod,linux-image-amd64,initramfs-tools,zstd,openssh-server,nftables,open-vm-tools,python3,python3-venv,sudo,ca-certificates,iproute2,procps
version=$("$PY" -c 'import tomllib; print(tomllib.load(open("'"$REPO"'/pyproject.toml", "rb"))["project"]["version"])')
name=vsphere-av-appliance-$version
mkdir -p "$OUT" "$WORK"

# -- 1. wheels (outside the image) ------------------------------------------------------
step "wheels: vsphere-av $version from this checkout, dependencies as binary wheels"
rm -rf "$WORK/wheels" && mkdir -p "$WORK/wheels"
quiet() { "$@" 2> >(grep -v "is ignored" >&2); }   # this machine's pip settings' noise
quiet "$PY" -m pip wheel -q --no-deps -w "$WORK/wheels" "$REPO"
quiet "$PY" -m pip wheel -q --only-binary=:all: -w "$WORK/wheels" "$WORK"/wheels/vsphere_av-*.whl

# -- 2. Debian base (cached by package list) --------------------------------------------
key=$(printf '%s %s %s' "$SUITE" "$PACKAGES" "$mirror" | sha256sum | cut -c1-16)
base=$OUT/cache/base-$key.tar
if [ ! -f "$base" ]; then
  step "debootstrap $SUITE minbase from $mirror"
  rm -rf "$WORK/base" && mkdir -p "$OUT/cache/debs"
  debootstrap --variant=minbase --cache-dir="$OUT/cache/debs" --include="$PACKAGES" \
    "$SUITE" "$WORK/base" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log"; exit 1; }
  tar -C "$WORK/base" -cf "$base.part" . && mv "$base.part" "$base"
  rm -rf "$WORK/base"
else
  step "Debian base from cache $(basename "$base")"
fi
ROOT=$WORK/root
rm -rf "$ROOT" "$WORK/var" && mkdir -p "$ROOT"
tar -C "$ROOT" -xf "$base"

# -- 3. configure inside the chroot -----------------------------------------------------
step "configure: account, venv, overlay, services"
cp -a "$HERE/rootfs/." "$ROOT/"
chmod 0755 "$ROOT/usr/local/sbin/vsphere-av-setup"
chmod 0440 "$ROOT/etc/sudoers.d/vsphere-av"
mkdir -p "$ROOT/tmp/wheels" && cp "$WORK"/wheels/*.whl "$ROOT/tmp/wheels/"
# A clean environment: nothing of this machine (pip settings, proxies) leaks into the image.
in_root() { env -i LC_ALL=C.UTF-8 HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$ROOT" "$@"; }
in_root useradd --system --user-group --home-dir /var/lib/vsphere-av --no-create-home \
  --shell /bin/sh --comment "vsphere-av engine and controller account" vsphere-av
in_root usermod -p '*' vsphere-av
# Reading the journal over SSH is how the controller's operator sees why a service failed.
in_root usermod -a -G systemd-journal vsphere-av
in_root usermod -p '*' root
in_root python3 -m venv /opt/vsphere-av/venv
in_root /opt/vsphere-av/venv/bin/pip install -q --no-index --no-cache-dir \
  --disable-pip-version-check --find-links /tmp/wheels vsphere-av
in_root /opt/vsphere-av/venv/bin/pip uninstall -q -y pip setuptools
rm -rf "$ROOT/tmp/wheels"
in_root systemctl enable -q systemd-networkd.service nftables.service ssh.service \
  vsphere-av-setup.service vsphere-av-engine.service
in_root systemctl mask -q systemd-networkd-wait-online.service apt-daily.timer \
  apt-daily-upgrade.timer e2scrub_all.timer systemd-firstboot.service
# Secrets and identities are made at first boot, never shipped.
rm -f "$ROOT"/etc/ssh/ssh_host_* "$ROOT/var/lib/dbus/machine-id"
: >"$ROOT/etc/machine-id"
echo vsphere-av-appliance >"$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tvsphere-av-appliance\n::1\tlocalhost ip6-localhost\n' \
  >"$ROOT/etc/hosts"
ln -sfn /run/vsphere-av/resolv.conf "$ROOT/etc/resolv.conf"
mkdir -p "$ROOT/var/lib/vsphere-av" "$ROOT/var/lib/vsphere-av-appliance" "$ROOT/var/log/journal"
in_root chown vsphere-av:vsphere-av /var/lib/vsphere-av
chmod 0700 "$ROOT/var/lib/vsphere-av"
# Logins: no password for any account (key-only SSH; the console has nothing to log in with).
sed -i 's/^\(PASS_MAX_DAYS\).*/\1\t365/; s/^UMASK.*/UMASK\t\t027/' "$ROOT/etc/login.defs"
# Kernel modules for hardware a VM on ESXi never has (sound, GPUs, radios, cameras, ...):
# about half of /lib/modules. The initramfs was made before, with what booting needs.
kver=$(basename "$(ls -d "$ROOT"/lib/modules/*)")
for dir in sound drivers/gpu drivers/media drivers/net/wireless drivers/infiniband \
           drivers/bluetooth drivers/staging drivers/isdn drivers/iio drivers/nfc drivers/mmc \
           drivers/mtd drivers/thunderbolt drivers/input/joystick drivers/input/touchscreen \
           drivers/net/can drivers/usb/serial net/bluetooth net/wireless net/mac80211 net/nfc \
           fs/ocfs2 fs/gfs2 fs/nfs fs/nfsd fs/smb fs/ceph fs/afs fs/ubifs; do
  rm -rf "$ROOT/lib/modules/$kver/kernel/$dir"
done
in_root depmod -a "$kver"
rm -rf "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* \
  "$ROOT"/var/log/*.log "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/locale/*
# Checks that must hold before anything is packed.
if awk -F: '$2 !~ /^(\*|!.*)$/ {print $1; bad=1} END {exit !bad}' "$ROOT/etc/shadow"; then
  echo "an account above has a password: refusing to build" >&2; exit 1
fi
for compiler in gcc cc c++ g++ make as ld clang tcc; do
  if in_root sh -c "command -v $compiler" >/dev/null; then
    echo "compiler or build tool in the image: $compiler" >&2; exit 1
  fi
done
[ -z "$(ls "$ROOT"/etc/ssh/ssh_host_* 2>/dev/null)" ] || { echo "SSH host key in the image" >&2; exit 1; }

# -- 4. file systems and the disk -------------------------------------------------------
step "file systems: ext4 / (read-only) and /var, EFI system partition"
root_uuid=$(python3 -c 'import uuid; print(uuid.uuid4())')
var_uuid=$(python3 -c 'import uuid; print(uuid.uuid4())')
cat >"$ROOT/etc/fstab" <<EOF
# / is read-only: everything the appliance writes is on /var or in memory.
UUID=$root_uuid / ext4 ro,nodev,errors=remount-ro 0 1
UUID=$var_uuid /var ext4 rw,nodev,nosuid 0 2
tmpfs /tmp tmpfs rw,nodev,nosuid,noexec,mode=1777,size=256m 0 0
EOF
mv "$ROOT/var" "$WORK/var" && mkdir -m 0755 "$ROOT/var"
mib() { echo $(( ($(du -sxm "$1" | cut -f1) * 5 / 4) + $2 )); }
root_mib=$(mib "$ROOT" 64)
var_mib=$(( $(mib "$WORK/var" 0) + 512 ))
mke2fs -q -F -t ext4 -L vsav-root -U "$root_uuid" -d "$ROOT" -E root_owner=0:0 -m 0 \
  "$WORK/root.img" "${root_mib}M"
mke2fs -q -F -t ext4 -L vsav-var -U "$var_uuid" -d "$WORK/var" -E root_owner=0:0 \
  "$WORK/var.img" "${var_mib}M"

efi=$WORK/efi && rm -rf "$efi" && mkdir -p "$efi"
(cd "$efi" && apt-get download -q shim-signed grub-efi-amd64-signed >/dev/null 2>&1) \
  || { echo "apt-get download shim-signed grub-efi-amd64-signed failed" >&2; exit 1; }
for deb in "$efi"/*.deb; do dpkg-deb -x "$deb" "$efi/x"; done
cat >"$efi/grub.cfg" <<EOF
set timeout=1
search --no-floppy --fs-uuid --set=root $root_uuid
menuentry "vsphere-av appliance" {
  linux /boot/vmlinuz-$kver root=UUID=$root_uuid ro console=ttyS0,115200 console=tty0 panic=10
  initrd /boot/initrd.img-$kver
}
EOF
rm -f "$WORK/esp.img" && mkfs.vfat -C -n VSAV-ESP "$WORK/esp.img" $((64 * 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$WORK/esp.img" ::/EFI ::/EFI/BOOT ::/EFI/debian
mcopy -i "$WORK/esp.img" "$efi/x/usr/lib/shim/shimx64.efi.signed" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$WORK/esp.img" "$efi/x/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed" \
  ::/EFI/BOOT/grubx64.efi
mcopy -i "$WORK/esp.img" "$efi/grub.cfg" ::/EFI/debian/grub.cfg
mcopy -i "$WORK/esp.img" "$efi/grub.cfg" ::/EFI/BOOT/grub.cfg

step "GPT disk: ESP 64 MiB, / ${root_mib} MiB, /var ${var_mib} MiB"
disk=$WORK/disk.raw
total_mib=$(( 1 + 64 + root_mib + var_mib + 1 ))
rm -f "$disk" && truncate -s "${total_mib}M" "$disk"
sfdisk -q "$disk" <<EOF
label: gpt
start=2048, size=$((64 * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI"
size=$((root_mib * 2048)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="root"
size=$((var_mib * 2048)), type=4D21B016-B534-45C2-A9FB-5C16E091FD2D, name="var"
EOF
i=1
for img in esp root var; do
  offset=$(sfdisk -J "$disk" | python3 -c "import json,sys; print(json.load(sys.stdin)['partitiontable']['partitions'][$((i - 1))]['start'])")
  dd if="$WORK/$img.img" of="$disk" bs=512 seek="$offset" conv=notrunc,sparse status=none
  i=$((i + 1))
done

# -- 5. VMDK, OVF, manifest, OVA --------------------------------------------------------
step "streamOptimized VMDK, OVF descriptor, manifest, OVA"
stage=$WORK/ova && rm -rf "$stage" && mkdir -p "$stage"
qemu-img convert -f raw -O vmdk -o subformat=streamOptimized,adapter_type=lsilogic \
  "$disk" "$stage/$name-disk1.vmdk"
capacity=$(stat -c %s "$disk")
"$PY" "$HERE/ovf.py" --template "$HERE/appliance.ovf.in" --version "$version" \
  --disk "$stage/$name-disk1.vmdk" --capacity "$capacity" --out "$stage/$name.ovf"
(cd "$stage" && for f in "$name.ovf" "$name-disk1.vmdk"; do
   printf 'SHA256(%s)= %s\n' "$f" "$(sha256sum "$f" | cut -d' ' -f1)"; done >"$name.mf")
# An OVA is a tar whose first member is the descriptor (then the manifest, then the disks).
tar -C "$stage" --format=ustar --owner=0 --group=0 --numeric-owner -cf "$OUT/$name.ova.part" \
  "$name.ovf" "$name.mf" "$name-disk1.vmdk"
mv "$OUT/$name.ova.part" "$OUT/$name.ova"
cp "$stage/$name.mf" "$OUT/$name.mf"
rm -rf "$ROOT" "$WORK/var" "$WORK"/*.img

size() { numfmt --to=iec-i --suffix=B "$(stat -c %s "$1")"; }
echo "built $OUT/$name.ova in $(( $(date +%s) - start )) s"
echo "  OVA $(size "$OUT/$name.ova"), VMDK $(size "$stage/$name-disk1.vmdk"), disk capacity $(size "$disk") (kernel $kver)"
[ "$(stat -c %s "$OUT/$name.ova")" -lt $((1024 * 1024 * 1024)) ] \
  || { echo "the OVA is 1 GiB or more" >&2; exit 1; }
