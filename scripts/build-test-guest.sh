#!/usr/bin/env bash
# Build the tiny test guest from Debian packages only (see docs/testing.md):
#   OUTDIR/vmlinuz     the host's packaged kernel (/boot/vmlinuz-*, linux-image-amd64)
#   OUTDIR/vmlinux     the same kernel uncompressed, booted through its PVH entry (faster)
#   OUTDIR/initrd.gz   busybox-static, that kernel's virtio/ext4/power-button modules,
#                      /usr/sbin/qemu-ga with the libraries ldd lists, an /init and a freeze hook
#   OUTDIR/data.qcow2  a template data disk: ext4 labelled "data" (mkfs.ext4 on a raw file,
#                      then qemu-img convert)
#   OUTDIR/stamp       what the files were built from; a rerun with the same inputs (kernel,
#                      qemu-guest-agent and busybox-static versions, this script's sha256)
#                      does nothing
# Usage: scripts/build-test-guest.sh [OUTDIR]   (default /var/cache/vmbackup-test-guest)
# Prints OUTDIR. Run as root (device nodes in the initramfs). Concurrent runs serialise on a lock.
set -euo pipefail

outdir=${1:-/var/cache/vmbackup-test-guest}
data_size=${VMBACKUP_GUEST_DATA_SIZE:-64M}
log() { printf '[build-test-guest] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (the initramfs needs device nodes owned by root)"
for tool in busybox modprobe cpio gzip mkfs.ext4 qemu-img ldd flock dpkg-query; do
  command -v "$tool" >/dev/null || die "missing $tool: run scripts/setup.sh"
done
[ -x /bin/busybox ] && busybox_bin=/bin/busybox || busybox_bin=$(command -v busybox)
[ -x /usr/sbin/qemu-ga ] || die "missing /usr/sbin/qemu-ga: install qemu-guest-agent (scripts/setup.sh)"

# The newest packaged kernel that has its modules installed (not necessarily the running one).
kver=""
for k in $(find /boot -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sed 's/^vmlinuz-//' | sort -V); do
  [ -f "/lib/modules/$k/modules.dep" ] && kver=$k
done
[ -n "$kver" ] || die "no /boot/vmlinuz-* with /lib/modules/<version>/modules.dep: install linux-image-amd64"

pkgver() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo none; }
self_sha=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)
stamp_want=$(printf 'kernel=%s %s\nqemu-guest-agent=%s\nbusybox-static=%s\nscript=%s\ndata_size=%s\n' \
  "$kver" "$(stat -c '%s-%Y' "/boot/vmlinuz-$kver")" "$(pkgver qemu-guest-agent)" "$(pkgver busybox-static)" \
  "$self_sha" "$data_size")

mkdir -p "$outdir"
chmod 0755 "$outdir"   # QEMU (user libvirt-qemu) reads the kernel and initrd from here
exec 9>"$outdir/.lock"
flock 9

up_to_date() {
  [ "$(cat "$outdir/stamp" 2>/dev/null)" = "$stamp_want" ] &&
    [ -s "$outdir/vmlinuz" ] && [ -s "$outdir/initrd.gz" ] && [ -s "$outdir/data.qcow2" ]
}
if up_to_date; then
  echo "$outdir"
  exit 0
fi

start=$(date +%s.%N)
work=$(mktemp -d "$outdir/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,sbin,etc/qemu,proc,sys,dev,run,tmp,data,lib,lib64,lib/modules,var,usr/bin,usr/sbin}
ln -s ../run "$root/var/run"
chmod 1777 "$root/tmp"
mknod -m 0600 "$root/dev/console" c 5 1
mknod -m 0666 "$root/dev/null" c 1 3

# busybox and its applets
cp "$busybox_bin" "$root/bin/busybox"
for applet in $("$busybox_bin" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done

# qemu-ga and its libraries (the ELF interpreter where the binary expects it; the rest in /lib,
# which the dynamic loader always searches)
cp /usr/sbin/qemu-ga "$root/usr/sbin/qemu-ga"
ldd /usr/sbin/qemu-ga | while read -r first second third rest; do
  if [ "$second" = "=>" ] && [ -n "$third" ] && [ -f "$third" ]; then
    cp -L "$third" "$root/lib/"
  elif [ -f "$first" ]; then   # the interpreter, e.g. /lib64/ld-linux-x86-64.so.2
    mkdir -p "$root/$(dirname "$first")"
    cp -L "$first" "$root/$first"
  fi
done
: "${rest:=}"

# Kernel modules in dependency order (modprobe resolves dependencies and soft dependencies such
# as ext4's crc32c); decompressed, since busybox insmod may not read .ko.xz/.ko.zst.
modlist=$work/modules.order
: > "$modlist"
for mod in virtio_pci virtio_blk virtio_console crc32c_generic ext4 button evdev; do
  modprobe -S "$kver" --show-depends "$mod" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
  base=$(basename "$ko")
  case $base in
    *.ko.xz) xz -dc "$ko" > "$root/lib/modules/${base%.xz}"; base=${base%.xz} ;;
    *.ko.zst) zstd -qdc "$ko" > "$root/lib/modules/${base%.zst}"; base=${base%.zst} ;;
    *.ko.gz) gzip -dc "$ko" > "$root/lib/modules/${base%.gz}"; base=${base%.gz} ;;
    *) cp "$ko" "$root/lib/modules/$base" ;;
  esac
  echo "$base" >> "$modlist"
done
cp "$modlist" "$root/etc/modules.order"
[ -s "$root/etc/modules.order" ] || die "no kernel modules found for $kver"

cat > "$root/init" <<'EOF'
#!/bin/sh
# The test guest's init (PID 1; root stays in the initramfs). Markers on the console:
# "vmbackup-guest: ..." lines, so the host can tell how far a boot got.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
say() { echo "vmbackup-guest: $*"; }
say "init"
while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done </etc/modules.order

# The data disk: /dev/vda, ext4, mounted at /data.
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
if mount -t ext4 /dev/vda /data; then say "data mounted"; else say "data NOT mounted"; fi

port_named() {
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && { echo "/dev/${p##*/}"; return 0; }
  done
  return 1
}
i=0
while ! ga_port=$(port_named org.qemu.guest_agent.0) && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
[ -n "$ga_port" ] || say "no virtio-serial port org.qemu.guest_agent.0"

# vmbackup.agent=0 on the kernel command line: boot with the agent off (/run/ga-off).
case " $(cat /proc/cmdline) " in *" vmbackup.agent=0 "*) : > /run/ga-off ;; esac

# The agent under supervision: restarted when it exits, unless /run/ga-off exists.
(
  while :; do
    if [ -e /run/ga-off ] || [ -z "$ga_port" ]; then sleep 0.2; continue; fi
    mkdir -p /run/qemu-ga
    say "agent starting"
    qemu-ga -m virtio-serial -p "$ga_port" -F/etc/qemu/fsfreeze-hook -f /run/qemu-ga.pid -t /run/qemu-ga
    say "agent exited ($?)"
    sleep 0.2
  done
) &

# The control port (org.vmbackup.control.0; the host connects to its unix socket): one command
# a line, one reply line ("ok ..."). It works without the agent: turn the agent on or off, kill it
# (a crash: the loop above restarts it), thaw /data in the guest kernel directly.
if ctl_port=$(port_named org.vmbackup.control.0); then
  (
    exec 3<>"$ctl_port"
    while :; do
      if ! read -r cmd <&3; then sleep 0.2; continue; fi   # EOF while the host is not connected
      case $cmd in
        ping) echo "ok ping" >&3 ;;
        agent-on) rm -f /run/ga-off; echo "ok agent-on" >&3 ;;
        agent-off)   # SIGTERM; qemu-ga ignores it while frozen, so SIGKILL after a second
          : > /run/ga-off
          killall qemu-ga 2>/dev/null
          i=0
          while pidof qemu-ga >/dev/null && [ $i -lt 10 ]; do sleep 0.1; i=$((i + 1)); done
          killall -9 qemu-ga 2>/dev/null
          echo "ok agent-off" >&3 ;;
        agent-kill) killall -9 qemu-ga 2>/dev/null; echo "ok agent-kill $?" >&3 ;;
        thaw) fsfreeze --unfreeze /data 2>/dev/null; echo "ok thaw $?" >&3 ;;
        *) echo "error unknown command: $cmd" >&3 ;;
      esac
    done
  ) &
else
  say "no virtio-serial port org.vmbackup.control.0"
fi

# ACPI power button (virsh shutdown without the agent): power off cleanly.
for ev in /sys/class/input/event*; do
  if [ "$(cat "$ev/device/name" 2>/dev/null)" = "Power Button" ]; then
    ( head -c 1 "/dev/input/${ev##*/}" >/dev/null && /sbin/vmbackup-poweroff ) &
  fi
done

say "ready"
# PID 1 must not exit; wait reaps the orphans reparented to it.
while :; do wait; sleep 1; done
EOF

cat > "$root/sbin/vmbackup-poweroff" <<'EOF'
#!/bin/sh
# Clean power-off: flush, unmount /data (remount read-only if busy), then power off.
echo "vmbackup-guest: power off" >/dev/console
: > /run/ga-off
sync
umount /data 2>/dev/null || mount -o remount,ro /data 2>/dev/null
sync
poweroff -f
EOF
# qemu-ga's guest-shutdown runs /sbin/shutdown -P/-h/-r +0 "...".
cat > "$root/sbin/shutdown" <<'EOF'
#!/bin/sh
case " $* " in
  *" -r "*) sync; umount /data 2>/dev/null; reboot -f ;;
  *) (sleep 0.1; exec /sbin/vmbackup-poweroff) & ;;
esac
exit 0
EOF

# qemu-ga runs this with "freeze" before freezing and "thaw" after thawing. A number N in
# /run/slow-freeze or /data/.slow-freeze delays the freeze by N seconds (tests use it to kill
# a backup run while the guest freezes).
cat > "$root/etc/qemu/fsfreeze-hook" <<'EOF'
#!/bin/sh
echo "vmbackup-guest: fsfreeze-hook $1" >/dev/console
if [ "$1" = freeze ]; then
  n=$(cat /run/slow-freeze 2>/dev/null || cat /data/.slow-freeze 2>/dev/null || echo 0)
  case $n in ''|*[!0-9]*) n=0 ;; esac
  [ "$n" -gt 0 ] && sleep "$n"
fi
echo "$(date +%s) $1" >> /run/fsfreeze-hook.log
exit 0
EOF
chmod 0755 "$root/init" "$root/sbin/vmbackup-poweroff" "$root/sbin/shutdown" "$root/etc/qemu/fsfreeze-hook"

(cd "$root" && find . -print0 | sort -z | cpio --null -o -H newc -R 0:0 --quiet) | gzip -6 > "$work/initrd.gz"
cp "/boot/vmlinuz-$kver" "$work/vmlinuz"

# The same kernel uncompressed (the ELF inside the bzImage): QEMU boots it through its PVH entry
# point, which skips the bzImage's self-decompression (about 3 s under TCG here). Only when the
# kernel has CONFIG_PVH; otherwise the guest boots vmlinuz.
extract_vmlinux() {   # like the kernel's scripts/extract-vmlinux: try each compressor's magic
  local img=$1 out=$2 magic cmd off
  while read -r magic cmd; do
    while read -r off; do
      tail -c +$((off + 1)) "$img" | $cmd > "$out" 2>/dev/null || true
      [ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] && return 0
    done < <(LC_ALL=C grep -aboP "$magic" "$img" | cut -d: -f1)
  done <<'MAGIC'
\xfd7zXZ\x00 xz -dcq
\x28\xb5\x2f\xfd zstd -dcq
\x1f\x8b\x08 gzip -dcq
MAGIC
  rm -f "$out"
  return 1
}
if grep -qx 'CONFIG_PVH=y' "/boot/config-$kver" 2>/dev/null && extract_vmlinux "$work/vmlinuz" "$work/vmlinux"; then
  :
else
  log "no PVH-bootable vmlinux from $kver: the guest boots vmlinuz"
  rm -f "$outdir/vmlinux"
fi

# Data disk template: ext4 "data", inode tables and journal initialised now (lazy init would
# write to the disk in the background of a running guest and dirty its bitmaps).
truncate -s "$data_size" "$work/data.raw"
mkfs.ext4 -q -F -L data -E lazy_itable_init=0,lazy_journal_init=0 "$work/data.raw"
qemu-img convert -q -f raw -O qcow2 "$work/data.raw" "$work/data.qcow2"
rm -f "$work/data.raw"

for f in vmlinuz vmlinux initrd.gz data.qcow2; do
  [ -f "$work/$f" ] || continue
  chmod 0644 "$work/$f"
  mv -f "$work/$f" "$outdir/$f"   # rename: a guest starting meanwhile sees the old or the new file
done
printf '%s\n' "$stamp_want" > "$work/stamp"
mv -f "$work/stamp" "$outdir/stamp"
log "built $outdir (kernel $kver, initrd $(du -k "$outdir/initrd.gz" | cut -f1) KiB) in $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN {printf "%.1f", e - s}') s"
echo "$outdir"
