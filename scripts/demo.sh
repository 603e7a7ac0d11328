#!/usr/bin/env bash
# The main job on an embedded default: a demo VM on the local libvirtd, backed up into a local
# repository (full, then an incremental after blocks were written). Run as root.
#   bash scripts/demo.sh [extra ansible-playbook args, e.g. -e vmbackup_demo_repository=/srv/demo]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$here/scripts/setup.sh"
venv=${VMBACKUP_VENV:-$here/.venv}
export ANSIBLE_COLLECTIONS_PATH
ANSIBLE_COLLECTIONS_PATH=$(bash "$here/scripts/install-collection.sh")
export ANSIBLE_LOCALHOST_WARNING=0 ANSIBLE_INVENTORY_UNPARSED_WARNING=0
exec "$venv/bin/ansible-playbook" -i localhost, -c local -e "ansible_python_interpreter=$venv/bin/python" \
  vmbackup.libvirt.demo "$@"
