#!/usr/bin/env bash
# Build the collection tarball from this checkout and install it into the virtualenv's
# collection path (what `ansible-galaxy collection install` gives users). Prints that path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VMBACKUP_VENV:-$here/.venv}
dist="$here/build"
mkdir -p "$dist"
rm -f "$dist"/vmbackup-libvirt-*.tar.gz
"$venv/bin/ansible-galaxy" collection build --force --output-path "$dist" "$here" >/dev/null
"$venv/bin/ansible-galaxy" collection install --force -p "$venv/collections" "$dist"/vmbackup-libvirt-*.tar.gz >/dev/null
echo "$venv/collections"
