#!/usr/bin/env bash
# Lint the collection's roles and playbooks the way users' CI would:
#   1. every role's meta/argument_specs.yml documents exactly the keys of its defaults/main.yml,
#      with the same default values (the contract prometheus.prometheus checks in its CI);
#   2. ansible-lint, production profile (config: .ansible-lint), on roles/ and playbooks/;
#   3. ansible-lint on the YAML examples of README.md, with no configuration at all, so that the
#      patterns users copy (module_defaults of group/vmbackup.libvirt.libvirt) need no exception.
# Works offline: ansible-lint is pinned in requirements/test.txt and finds this collection
# through a collections tree that links to the checkout (nothing is installed or downloaded).
#
# Usage: scripts/lint.sh            Environment: VENV (default <repo>/.venv)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$(cd "${VENV:-$ROOT/.venv}" && pwd)"
cd "$ROOT"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/collections/ansible_collections/vmbackup"
ln -s "$ROOT" "$work/collections/ansible_collections/vmbackup/libvirt"
export ANSIBLE_COLLECTIONS_PATH="$work/collections"
export ANSIBLE_LOCAL_TEMP="$work/ansible-tmp" ANSIBLE_HOME="$work/ansible-home"

status=0
echo "== argument specs match defaults"
"$VENV/bin/python" - <<'PY' || status=1
import pathlib
import sys

import yaml

failed = False
for role in sorted(pathlib.Path("roles").iterdir()):
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
    options = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    for key in sorted(set(defaults) ^ set(options)):
        where = "defaults/main.yml only" if key in defaults else "meta/argument_specs.yml only"
        print(f"{role.name}: {key}: in {where}")
        failed = True
    for key in sorted(set(defaults) & set(options)):
        if options[key].get("default") != defaults[key]:
            print(f"{role.name}: {key}: default {defaults[key]!r} in defaults/main.yml, {options[key].get('default')!r} in argument_specs")
            failed = True
        if not options[key].get("description"):
            print(f"{role.name}: {key}: no description in argument_specs")
            failed = True
    print(f"{role.name}: {len(options)} options")
sys.exit(1 if failed else 0)
PY

echo "== ansible-lint (production profile): roles and playbooks"
"$VENV/bin/ansible-lint" --offline --format pep8 roles playbooks || status=1

echo "== ansible-lint (production profile, no configuration): README examples"
mkdir -p "$work/readme"
"$VENV/bin/python" - "$work/readme" <<'PY'
import pathlib
import re
import sys

out = pathlib.Path(sys.argv[1])
blocks = re.findall(r"^```yaml\n(.*?)^```", pathlib.Path("README.md").read_text(), re.S | re.M)
for i, block in enumerate(blocks, 1):
    if block.lstrip().startswith("- name:") and "hosts:" in block:  # whole plays only
        (out / f"readme_example_{i}.yml").write_text("---\n" + block)
print(f"{len(list(out.iterdir()))} playbook examples")
PY
if compgen -G "$work/readme/*.yml" >/dev/null; then
    (cd "$work/readme" && "$VENV/bin/ansible-lint" --offline --profile production --format pep8 ./*.yml) || status=1
fi
if [ "$status" -eq 0 ]; then echo "lint: ok"; else echo "lint: FAILED"; fi
exit "$status"
