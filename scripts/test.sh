#!/usr/bin/env bash
# The whole test suite on a fresh machine (run as root): set-up, ansible-test sanity,
# ansible-lint of the roles and playbooks, the docs build and the changelog check (scripts/docs.sh),
# then unit and integration tests (pytest; the integration tests use the real libvirtd and QEMU).
#   bash scripts/test.sh [extra pytest args]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
bash scripts/setup.sh
venv=${VMBACKUP_VENV:-$here/.venv}

echo "== ansible-test sanity"
VENV=$venv bash scripts/sanity.sh

echo "== ansible-lint (roles, playbooks, the YAML examples of README.md and docs/guide.md)"
VENV=$venv bash scripts/lint.sh

echo "== docs and changelog (antsibull-changelog lint + regeneration, antsibull-docs lint + build, sphinx -W)"
VENV=$venv bash scripts/docs.sh

echo "== ansible-galaxy collection build"
"$venv/bin/ansible-galaxy" collection build --force --output-path "$(mktemp -d)" . 

echo "== pytest (unit + integration)"
exec "$venv/bin/python" -m pytest "$@"
