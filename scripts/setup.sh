#!/usr/bin/env bash
# Prepare this Debian host for the demo and the test suite. Idempotent; run as root.
#  - apt packages: libvirt daemon, QEMU, qemu-img, libvirt-dev + pkg-config (to build the binding),
#    faketime (the tests run weeks of schedules under a shifted clock), and a kernel, busybox-static,
#    qemu-guest-agent and cpio for the tiny test guest (scripts/build-test-guest.sh), and
#    openssh-server, iproute2, procps and util-linux for the multi-host test bed (scripts/testbed.sh;
#    sshd runs only inside the bed's hosts, never started here)
#  - a virtualenv at .venv with the pinned tool chain (requirements/test.txt)
#  - libnbd for pull-mode incrementals (python3-libnbd; libnbd-bin for nbdcopy/nbdinfo) and the peer
#    tool the benchmarks compare with (virtnbdbackup); the Debian libnbd binding (nbd.py,
#    libnbdmod*.so: not on PyPI) linked into the virtualenv when its Python has the same ABI
#  - virtlogd and libvirtd running (started with -d when there is no systemd; a running one is left alone)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VMBACKUP_VENV:-$here/.venv}
log() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh must run as root (it installs packages and starts libvirtd)" >&2
  exit 1
fi

packages=(libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils libvirt-clients
          libvirt-dev pkg-config python3-venv python3-dev gcc rsync git shellcheck faketime
          linux-image-amd64 busybox-static qemu-guest-agent cpio
          openssh-server iproute2 procps util-linux
          python3-libnbd libnbd-bin virtnbdbackup)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Package scripts try to start services; without systemd that fails harmlessly, so tell them not to.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
  trap - EXIT
fi

python=${VMBACKUP_PYTHON:-python3}
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$here/requirements/test.txt" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "creating virtualenv $venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r "$here/requirements/test.txt"
  echo "$want" > "$stamp"
fi
"$venv/bin/python" -c 'import libvirt, ansible, jmespath' || { echo "virtualenv $venv is broken" >&2; exit 1; }

# The libnbd binding comes from the distribution (python3-libnbd); link it into the virtualenv.
# Only a binding built for the virtualenv's Python ABI (the same EXT_SUFFIX) can load there.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
suffix=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
nbd_py=$(dpkg-query -L python3-libnbd 2>/dev/null | grep -E '/nbd\.py$' | head -n1 || true)
nbd_so=$(dpkg-query -L python3-libnbd 2>/dev/null | grep -F "/libnbdmod$suffix" | head -n1 || true)
if [ -n "$nbd_py" ] && [ -n "$nbd_so" ]; then
  for f in "$nbd_py" "$nbd_so"; do
    [ "$(readlink "$site/$(basename "$f")" 2>/dev/null)" = "$f" ] || ln -sfn "$f" "$site/$(basename "$f")"
  done
  "$venv/bin/python" -c 'import nbd; nbd.NBD()' || { echo "the libnbd binding does not load in $venv" >&2; exit 1; }
else
  log "warning: no python3-libnbd binding for $suffix: pull-mode incrementals fall back to push (transport auto)"
fi

# /dev/kvm without udev is root:root 0600; udev would make it root:kvm 0660 (libvirt-qemu is in kvm).
if [ -c /dev/kvm ] && [ "$(stat -c %G /dev/kvm)" = root ] && getent group kvm >/dev/null; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl start virtlogd.socket libvirtd.service
  else
    pgrep -x virtlogd >/dev/null || virtlogd -d
    pgrep -x libvirtd >/dev/null || libvirtd -d
  fi
  for _ in $(seq 1 60); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.5
  done
fi
virsh -c qemu:///system version >/dev/null || { echo "libvirtd does not answer on qemu:///system" >&2; exit 1; }
log "ready: $(virsh -c qemu:///system version | awk '/Running hypervisor/ {print $3, $4}'), $("$venv/bin/ansible" --version | sed -n 1p)"
