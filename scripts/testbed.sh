#!/usr/bin/env bash
# The multi-host test bed: hypervisor hosts hv1..hvN on this one machine (docs/testing.md,
# "The multi-host test bed").
#
# Each host is a mount + net + PID + UTS namespace (hostname hvN) with a private /run, its own
# /etc/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt (bind mounts from the state
# directory), its own virtlogd + libvirtd + sshd, and a veth pair (root side 10.231.N.1/30, host side
# 10.231.N.2). <state>/shared is bind-mounted at /srv/vmbackup in every host (a shared repository).
#
#   testbed.sh up [--hosts N]      bring hv1..hvN up (default 3); on a running bed: check, repair, return
#   testbed.sh down                everything gone: processes (QEMU too), mounts, veths, the state dir
#   testbed.sh status              JSON: per host whether its namespace, libvirtd and sshd are alive
#   testbed.sh exec HOST CMD...    run CMD inside all of HOST's namespaces
#   testbed.sh libvirtd HOST stop|start
#   testbed.sh ssh HOST block|unblock   (block: the root-side veth down and an unreachable route:
#                                  "No route to host" at once; open connections to HOST are reset)
#
# State directory: VMBACKUP_TESTBED_DIR (default /var/lib/vmbackup-testbed): inventory.ini,
# hosts.json, ssh/id_ed25519, shared/, hvN/{etc,lib,cache,log,run.log,...}. VMBACKUP_TESTBED_NET
# (default 10.231) the hosts' addresses 10.231.N.2: a second bed at once needs its own dir and net.
# VENV (default: the repository's .venv) names the virtualenv whose python Ansible uses on the hosts.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state=${VMBACKUP_TESTBED_DIR:-/var/lib/vmbackup-testbed}
venv=${VENV:-${VMBACKUP_VENV:-$here/.venv}}
# the first two octets of the hosts' addresses; a second bed on the same machine needs its own
net_prefix=${VMBACKUP_TESTBED_NET:-10.231}
if ! [[ $net_prefix =~ ^10\.([0-9]{1,3})$ ]] || [ "${BASH_REMATCH[1]}" -gt 255 ]; then
  echo "VMBACKUP_TESTBED_NET wants 10.X" >&2
  exit 1
fi
veth_of() { echo "vb${net_prefix#10.}-$1"; }  # the root-side veth of a host: vb231-hv1

log() { printf '[testbed] %s\n' "$*" >&2; }
die() { printf '[testbed] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "testbed.sh must run as root"
case $state in
  /*) ;;
  *) die "VMBACKUP_TESTBED_DIR must be an absolute path: $state" ;;
esac
[[ $state =~ ^[A-Za-z0-9_./-]+$ ]] || die "VMBACKUP_TESTBED_DIR may hold only letters, digits and _ . / - : $state"
[ "$state" != / ] || die "VMBACKUP_TESTBED_DIR must not be /"

serialize() {  # one up/down/libvirtd/ssh at a time per bed (the test fixture's session lock is another file)
  exec 9>"$state.cmd.lock"
  flock -w 120 9 || die "another testbed.sh holds $state.cmd.lock"
}

host_index() {  # hvN -> N
  [[ $1 =~ ^hv([1-9][0-9]?)$ ]] || die "no such host name: $1 (hv1..hv99)"
  echo "${BASH_REMATCH[1]}"
}
host_pid() {  # the namespace's init (PID 1 inside) as seen from here; empty when not alive
  local f=$state/$1/init.pid pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  # alive and still our init (not a recycled pid)
  [ -n "$pid" ] || return 0
  local args=()
  mapfile -d '' -t args 2>/dev/null < "/proc/$pid/cmdline" || return 0
  if [ "${args[*]}" = "testbed-init $state/$1/init.sh" ]; then
    echo "$pid"
  fi
}
in_host() {  # in_host HOST CMD... : CMD inside all of HOST's namespaces
  local h=$1 pid; shift
  pid=$(host_pid "$h")
  [ -n "$pid" ] || die "$h is not running"
  nsenter --target "$pid" --mount --net --pid --uts --ipc -- "$@" 9>&-  # daemons must not hold the command lock
}
virsh_h() {  # virsh against HOST's libvirtd, from the root namespace
  local h=$1 pid; shift
  pid=$(host_pid "$h")
  virsh -q -c "qemu+unix:///system?socket=/proc/$pid/root/run/libvirt/libvirt-sock" "$@"
}
find_inits() {  # the pids of this state dir's host inits, also those no init.pid names
  local re
  re=$(printf '%s' "$state" | sed 's/[].[\\*^$+?(){}|]/\\&/g')
  pgrep -f "^testbed-init $re/hv[0-9]+/init\\.sh\$" || true
}
existing_hosts() {
  local d
  for d in "$state"/hv*; do
    [ -d "$d" ] || continue
    basename "$d"
  done | sort -V
}
daemon_alive() {  # daemon_alive HOST PIDFILE-inside-host
  local h=$1 f=$2 root pid
  root=/proc/$(host_pid "$h")/root
  [ -f "$root$f" ] || return 1
  pid=$(cat "$root$f" 2>/dev/null) || return 1
  # the pid file holds the pid in the host's PID namespace: check it there
  in_host "$h" kill -0 "$pid" 2>/dev/null
}

# ---------------------------------------------------------------------------------------------
is_bed_dir() {  # what down may remove: a directory that up made (its marker file), or an empty one
  [ -f "$state/.vmbackup-testbed" ] || [ -z "$(ls -A "$state" 2>/dev/null)" ] ||
    { [ -f "$state/ssh/id_ed25519" ] && [ -d "$state/shared" ] && [ -f "$state/hv1/init.sh" ]; }  # made before the marker
}

prepare_state() {
  if [ -d "$state" ] && ! is_bed_dir; then
    die "$state exists and is not a test bed's state directory (no .vmbackup-testbed in it): not touching it"
  fi
  install -d -m 0711 -o root -g root "$state"
  touch "$state/.vmbackup-testbed"
  install -d -m 0711 -o root -g root "$state/shared"
  chmod 0711 "$state" "$state/shared"
  install -d -m 0700 "$state/ssh" "$state/cp"
  if [ ! -f "$state/ssh/id_ed25519" ]; then
    ssh-keygen -q -t ed25519 -N '' -C vmbackup-testbed -f "$state/ssh/id_ed25519"
  fi
  install -m 0600 "$state/ssh/id_ed25519.pub" "$state/ssh/authorized_keys"
}

prepare_host() {  # the host's directories, configuration and init script
  local h=$1 n d
  n=$(host_index "$h")
  d=$state/$h
  install -d -m 0755 "$d"
  if [ ! -f "$d/prepared" ]; then
    # /etc/libvirt: the machine's configuration without its domains and networks
    mkdir -p "$d/etc"
    rsync -a --exclude '/qemu/*.xml' --exclude '/qemu/networks/' --exclude '/qemu/autosnapshot' \
      --exclude '/secrets/*' --exclude '/storage/' /etc/libvirt/ "$d/etc/"
    install -d -m 0755 "$d/etc/qemu/networks/autostart"
    # Two libvirtds both name a domain's cgroup machine/qemu-<id>-<name>.libvirt-qemu (ids start at 1
    # in each): without controllers they create none, so hosts cannot collide (nor with the machine's).
    printf '\n# vmbackup test bed (scripts/testbed.sh)\ncgroup_controllers = [ ]\n' >> "$d/etc/qemu.conf"
    # /var/lib/libvirt: its top-level directories (owners, modes), nothing in them; libvirtd makes
    # the rest of qemu/ (channel/target, save, snapshot, nvram ...) when it starts
    mkdir -p "$d/lib"
    rsync -a --exclude '/*/*' --include '/*/' --exclude '/*' /var/lib/libvirt/ "$d/lib/"
    install -d -m 0711 "$d/lib/images"
    # /var/cache/libvirt: the QEMU capabilities cache saves each libvirtd the probe (seconds)
    mkdir -p "$d/cache"
    [ ! -d /var/cache/libvirt ] || rsync -a /var/cache/libvirt/ "$d/cache/"
    install -d -m 0755 "$d/log"
    install -d -m 0755 "$d/log/qemu"
    # sshd
    ssh-keygen -q -t ed25519 -N '' -C "$h" -f "$d/ssh_host_ed25519_key"
    cat > "$d/sshd_config" <<EOF
# vmbackup test bed $h (scripts/testbed.sh)
ListenAddress $net_prefix.$n.2:22
HostKey $d/ssh_host_ed25519_key
PidFile /run/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile $state/ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
X11Forwarding no
PrintMotd no
AcceptEnv LANG LC_*
Subsystem sftp internal-sftp
MaxStartups 100:30:200
MaxSessions 100
EOF
    # PID 1 of the host: mounts, hostname, then it only reaps orphans until it is killed
    cat > "$d/init.sh" <<EOF
set -e
hostname $h
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir -p /run/lock /run/sshd && chmod 0755 /run/sshd
mount --bind $d/etc /etc/libvirt
mount --bind $d/lib /var/lib/libvirt
mount --bind $d/cache /var/cache/libvirt
mount --bind $d/log /var/log/libvirt
# /srv/vmbackup without touching the machine's /srv: a private tmpfs /srv in this host
mount -t tmpfs -o mode=0755 tmpfs /srv
mkdir -m 0711 /srv/vmbackup
mount --bind $state/shared /srv/vmbackup
ip link set lo up
touch /run/testbed-ready
set +e
trap 'exit 0' TERM
while :; do sleep 3600 & wait \$!; done
EOF
    touch "$d/prepared"
  fi
}

start_ns() {  # the namespace and its init
  local h=$1 d=$state/$1 pid i
  pid=$(host_pid "$h")
  [ -n "$pid" ] && return 0
  rm -f "$d/init.pid"
  # exec -a names the init (host_pid checks it); setsid: the bed outlives the caller's session
  setsid unshare --mount --net --pid --uts --ipc --fork --mount-proc --propagation private \
    bash -c "exec -a testbed-init bash $d/init.sh" </dev/null >>"$d/run.log" 2>&1 9>&- &
  local ushare=$!
  for i in $(seq 1 200); do
    pid=$(pgrep -P "$ushare" 2>/dev/null | head -n1 || true)
    if [ -n "$pid" ] && [ -e "/proc/$pid/root/run/testbed-ready" ]; then
      break
    fi
    kill -0 "$ushare" 2>/dev/null || die "$h: its namespace did not come up (see $d/run.log)"
    sleep 0.05
  done
  if [ -z "$pid" ] || [ ! -e "/proc/$pid/root/run/testbed-ready" ]; then
    die "$h: its namespace did not come up in 10 s"
  fi
  echo "$pid" > "$d/init.pid"
  echo "$ushare" > "$d/unshare.pid"
}

setup_net() {
  local h=$1 n pid veth
  n=$(host_index "$h")
  pid=$(host_pid "$h")
  veth=$(veth_of "$h")
  if ! in_host "$h" ip link show eth0 >/dev/null 2>&1; then
    ip link del "$veth" 2>/dev/null || true
    ip link add "$veth" type veth peer name eth0 netns "$pid"
    in_host "$h" ip addr add "$net_prefix.$n.2/30" dev eth0
    in_host "$h" ip link set eth0 up
    # the other bed hosts (10.231.0.0/16) through the root namespace
    in_host "$h" ip route add "$net_prefix.0.0/16" via "$net_prefix.$n.1" 2>/dev/null || true
  fi
  ip route del unreachable "$net_prefix.$n.0/30" 2>/dev/null || true  # 'ssh HOST block' put it there
  ip addr replace "$net_prefix.$n.1/30" dev "$veth"
  ip link set "$veth" up
}

start_daemons() {
  local h=$1 d=$state/$1 i
  daemon_alive "$h" /run/virtlogd.pid || in_host "$h" virtlogd -d
  daemon_alive "$h" /run/libvirtd.pid || in_host "$h" libvirtd -d
  daemon_alive "$h" /run/sshd.pid || in_host "$h" /usr/sbin/sshd -f "$d/sshd_config" -E "$d/sshd.log"
  for i in $(seq 1 200); do
    virsh_h "$h" uri >/dev/null 2>&1 && break
    sleep 0.05
  done
  virsh_h "$h" uri >/dev/null 2>&1 || die "$h: libvirtd does not answer (see $d/log/libvirtd.log)"
}

setup_libvirt() {  # the isolated network for drills; no default network
  local h=$1 d=$state/$1
  if ! virsh_h "$h" net-info vmbackup-isolated >/dev/null 2>&1; then
    cat > "$d/vmbackup-isolated.xml" <<EOF
<network>
  <name>vmbackup-isolated</name>
  <bridge name='vbiso0' stp='off' delay='0'/>
</network>
EOF
    virsh_h "$h" net-define "$d/vmbackup-isolated.xml" >/dev/null
    virsh_h "$h" net-autostart vmbackup-isolated >/dev/null
  fi
  if [ "$(virsh_h "$h" net-info vmbackup-isolated | awk '/^Active:/ {print $2}')" != yes ]; then
    virsh_h "$h" net-start vmbackup-isolated >/dev/null
  fi
}

write_meta() {
  local h n pid first=1 py=$venv/bin/python
  [ -x "$py" ] || die "no python in the virtualenv $venv (set VENV)"
  {
    echo "# vmbackup test bed (scripts/testbed.sh); regenerated by every 'up'"
    echo "[hypervisors]"
    for h in $(existing_hosts); do
      [ -n "$(host_pid "$h")" ] || continue
      n=$(host_index "$h")
      echo "$h ansible_host=$net_prefix.$n.2"
    done
    echo
    echo "[hypervisors:vars]"
    echo "ansible_user=root"
    echo "ansible_ssh_private_key_file=$state/ssh/id_ed25519"
    echo "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=5 -o GSSAPIAuthentication=no'"
    echo "ansible_pipelining=true"
    echo "ansible_control_path_dir=$state/cp"
    echo "ansible_python_interpreter=$py"
  } > "$state/inventory.ini.tmp"
  mv "$state/inventory.ini.tmp" "$state/inventory.ini"
  {
    echo "{"
    for h in $(existing_hosts); do
      pid=$(host_pid "$h")
      [ -n "$pid" ] || continue
      n=$(host_index "$h")
      [ $first -eq 1 ] || echo ","
      first=0
      printf '  "%s": {"address": "%s", "pid": %s, "uri": "%s", "root": "%s"}' "$h" "$net_prefix.$n.2" "$pid" \
        "qemu+unix:///system?socket=/proc/$pid/root/run/libvirt/libvirt-sock" "/proc/$pid/root"
    done
    echo
    echo "}"
  } > "$state/hosts.json.tmp"
  mv "$state/hosts.json.tmp" "$state/hosts.json"
}

check_ssh() {
  local h=$1 n i
  n=$(host_index "$h")
  for i in $(seq 1 100); do
    if ssh -q -i "$state/ssh/id_ed25519" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
         -o ConnectTimeout=2 "root@$net_prefix.$n.2" true 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  die "$h: no SSH on $net_prefix.$n.2 (see $state/$h/sshd.log)"
}

bring_up_host() {
  local h=$1
  prepare_host "$h"
  start_ns "$h"
  setup_net "$h"
  start_daemons "$h"
  setup_libvirt "$h"
  check_ssh "$h"
}

cmd_up() {
  local count=3 h i pids=() rc=0 t0
  while [ $# -gt 0 ]; do
    case $1 in
      --hosts) count=${2:?--hosts N}; shift 2 ;;
      --hosts=*) count=${1#--hosts=}; shift ;;
      *) die "up: unknown argument $1" ;;
    esac
  done
  [[ $count =~ ^[1-9][0-9]?$ ]] || die "--hosts wants 1..99"
  t0=$(date +%s.%N)
  prepare_state
  for i in $(seq 1 "$count"); do
    bring_up_host "hv$i" &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || rc=1; done
  [ $rc -eq 0 ] || die "bring-up failed (state kept in $state; 'testbed.sh down' removes it)"
  write_meta
  log "up: $(existing_hosts | tr '\n' ' ')in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s; inventory $state/inventory.ini"
}

# in_ns "NS...": true while any process is in one of the mount namespaces (readlink of ns/mnt)
in_ns() {
  local p ns
  [ -n "${1// /}" ] || return 1
  for p in /proc/[0-9]*; do
    ns=$(readlink "$p/ns/mnt" 2>/dev/null) || continue
    case " $1 " in *" $ns "*) return 0 ;; esac
  done
  return 1
}

cmd_down() {
  local h pid ushare d sock t0 i
  t0=$(date +%s.%N)
  [ -d "$state" ] || { log "down: nothing to do"; return 0; }
  is_bed_dir || die "$state is not a test bed's state directory (no .vmbackup-testbed in it): not removing it"
  # Ansible's SSH control masters for the bed hosts (their sockets live in the state dir)
  for sock in "$state"/cp/*; do
    [ -S "$sock" ] || continue
    ssh -o ControlPath="$sock" -O exit dummy >/dev/null 2>&1 || true
  done
  local namespaces=""
  for h in $(existing_hosts); do
    d=$state/$h
    pid=$(host_pid "$h")
    if [ -n "$pid" ]; then
      namespaces="$namespaces $(readlink "/proc/$pid/ns/mnt" 2>/dev/null || true)"
      # killing a PID namespace's init kills everything in it (libvirtd, QEMU, sshd); then its
      # mounts and its network namespace (the veth pair with it) go
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  # the kill is asynchronous: wait (at most 10 s) until no process is left in those namespaces
  for i in $(seq 1 200); do
    in_ns "$namespaces" || break
    sleep 0.05
  done
  # an init whose pid file was lost (an interrupted 'up'): found by its exact command line
  for pid in $(find_inits); do kill -KILL "$pid" 2>/dev/null || true; done
  for h in $(existing_hosts); do
    d=$state/$h
    if [ -f "$d/unshare.pid" ]; then
      ushare=$(cat "$d/unshare.pid")
      for i in $(seq 1 100); do
        if [ ! -d "/proc/$ushare" ] || [ "$(cat "/proc/$ushare/comm" 2>/dev/null)" != unshare ]; then break; fi
        sleep 0.05
      done
    fi
    ip link del "$(veth_of "$h")" 2>/dev/null || true
    ip route del unreachable "$net_prefix.$(host_index "$h").0/30" 2>/dev/null || true
  done
  rm -rf "$state"
  log "down: done in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s"
}

cmd_status() {
  local h pid first=1 ns lv sd
  printf '{'
  for h in $(existing_hosts); do
    pid=$(host_pid "$h")
    ns=false lv=false sd=false
    if [ -n "$pid" ]; then
      ns=true
      virsh_h "$h" uri >/dev/null 2>&1 && lv=true
      daemon_alive "$h" /run/sshd.pid && sd=true
    fi
    [ $first -eq 1 ] || printf ','
    first=0
    printf '\n  "%s": {"namespace": %s, "pid": %s, "libvirtd": %s, "sshd": %s, "ssh_blocked": %s}' \
      "$h" "$ns" "${pid:-null}" "$lv" "$sd" \
      "$( [ "$(cat "/sys/class/net/$(veth_of "$h")/operstate" 2>/dev/null)" = down ] && echo true || echo false)"
  done
  printf '\n}\n'
}

cmd_libvirtd() {
  local h=${1:?libvirtd HOST stop|start} what=${2:?libvirtd HOST stop|start} pid i
  host_index "$h" >/dev/null
  [ -n "$(host_pid "$h")" ] || die "$h is not running"
  case $what in
    stop)
      if daemon_alive "$h" /run/libvirtd.pid; then
        pid=$(cat "/proc/$(host_pid "$h")/root/run/libvirtd.pid")
        in_host "$h" kill -TERM "$pid"
        for i in $(seq 1 200); do
          in_host "$h" kill -0 "$pid" 2>/dev/null || break
          sleep 0.05
        done
        in_host "$h" kill -0 "$pid" 2>/dev/null && die "$h: libvirtd did not stop"
      fi
      # libvirtd removes its socket on a clean exit; make sure nothing answers there any more
      rm -f "/proc/$(host_pid "$h")/root/run/libvirt/libvirt-sock"
      ;;
    start)
      start_daemons "$h"
      ;;
    *) die "libvirtd HOST stop|start" ;;
  esac
}

cmd_ssh() {
  local h=${1:?ssh HOST block|unblock} what=${2:?ssh HOST block|unblock}
  host_index "$h" >/dev/null
  [ -n "$(host_pid "$h")" ] || die "$h is not running"
  case $what in
    block)
      ip link set "$(veth_of "$h")" down
      # without its link route the address would go to the default gateway and hang: refuse at once
      ip route replace unreachable "$net_prefix.$(host_index "$h").0/30"
      # connections already open (Ansible's SSH control masters) break as in a network failure,
      # instead of hanging for TCP's retransmission timeout (minutes)
      ss -K dst "$net_prefix.$(host_index "$h").2" >/dev/null 2>&1 || log "ss -K failed: open connections to $h may hang"
      ;;
    unblock) setup_net "$h"; check_ssh "$h" ;;
    *) die "ssh HOST block|unblock" ;;
  esac
}

case ${1:-} in
  up|down|libvirtd|ssh) serialize ;;
esac
case ${1:-} in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  exec) shift; h=${1:?exec HOST CMD...}; shift; host_index "$h" >/dev/null; in_host "$h" "$@" ;;
  libvirtd) shift; cmd_libvirtd "$@" ;;
  ssh) shift; cmd_ssh "$@" ;;
  *) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
