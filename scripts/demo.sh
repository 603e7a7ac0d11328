#!/usr/bin/env bash
# The main job on an embedded default: demo VMs on the local libvirtd (three disk-only ones and a
# tiny real guest), backed up into a local repository by the weekly playbook, then an incremental,
# the catalog, verify, a restore, and a snapshot + rollback of the guest. Run as root.
#   bash scripts/demo.sh [extra ansible-playbook args, e.g. -e vmbackup_demo_repository=/srv/demo]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$here/scripts/setup.sh"
venv=${VMBACKUP_VENV:-$here/.venv}
export ANSIBLE_COLLECTIONS_PATH
ANSIBLE_COLLECTIONS_PATH=$(bash "$here/scripts/install-collection.sh")
# The fourth demo VM is a tiny real guest (Linux and the QEMU guest agent, built from Debian
# packages by scripts/build-test-guest.sh): its backups are application-consistent, and the
# playbook snapshots it before a "patch" and rolls it back.
app=${VMBACKUP_DEMO_APP:-vmbackup-demo-app}
if ! virsh -c qemu:///system domuuid "$app" >/dev/null 2>&1; then
  "$venv/bin/python" "$here/tests/integration/guest.py" define "$app" >/dev/null
fi
if [ "$(virsh -c qemu:///system domstate "$app")" != running ]; then
  virsh -c qemu:///system start "$app" >/dev/null
fi
export ANSIBLE_LOCALHOST_WARNING=0 ANSIBLE_INVENTORY_UNPARSED_WARNING=0
exec "$venv/bin/ansible-playbook" -i localhost, -c local -e "ansible_python_interpreter=$venv/bin/python" \
  -e "vmbackup_demo_app=$app" vmbackup.libvirt.demo "$@"
