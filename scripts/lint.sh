#!/usr/bin/env bash
# Lint the collection's roles and playbooks the way users' CI would:
#   1. every role's meta/argument_specs.yml documents exactly the keys of its defaults/main.yml,
#      with the same default values (the contract prometheus.prometheus checks in its CI);
#   2. ansible-lint, production profile (config: .ansible-lint), on roles/ and playbooks/;
#   3. the YAML examples of README.md and docs/guide.md: every ```yaml block parses, and every one
#      that is a whole play goes through ansible-lint with no configuration at all, so that the
#      patterns users copy (module_defaults of group/vmbackup.libvirt.libvirt) need no exception;
#      and every option those plays give a vmbackup.libvirt module (ansible-doc) or role
#      (meta/argument_specs.yml) is one it documents (ansible-lint's args rule does not see our
#      modules' argspecs), so a typo in an example fails here.
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

echo "== ansible-lint (production profile, no configuration): README.md and docs/guide.md examples"
mkdir -p "$work/examples"
"$VENV/bin/python" - "$work/examples" README.md docs/guide.md <<'PY' || status=1
import pathlib
import re
import sys

import yaml

out = pathlib.Path(sys.argv[1])
failed = False
for doc in sys.argv[2:]:
    stem = re.sub(r"\W", "_", pathlib.Path(doc).stem.lower())
    blocks = re.findall(r"^```yaml\n(.*?)^```", pathlib.Path(doc).read_text(), re.S | re.M)
    plays = 0
    for i, block in enumerate(blocks, 1):
        try:
            list(yaml.safe_load_all(block))
        except yaml.YAMLError as exc:
            print(f"{doc}: yaml example {i} does not parse: {exc}")
            failed = True
            continue
        if block.lstrip().startswith("- name:") and "hosts:" in block:  # whole plays only
            (out / f"{stem}_example_{i}.yml").write_text("---\n" + block)
            plays += 1
    print(f"{doc}: {len(blocks)} yaml examples, {plays} plays")
sys.exit(1 if failed else 0)
PY
echo "== the examples' options: every option of a vmbackup.libvirt module or role is one it documents"
"$VENV/bin/python" - "$VENV/bin/ansible-doc" "$work/examples" <<'PY' || status=1
import json
import pathlib
import subprocess
import sys

import yaml

ansible_doc, out = sys.argv[1], pathlib.Path(sys.argv[2])
PREFIX = "vmbackup.libvirt."
KEYWORDS = {"name", "register", "when", "loop", "loop_control", "vars", "tags", "changed_when", "failed_when", "notify",
            "delegate_to", "become", "ignore_errors", "check_mode", "diff", "no_log", "environment", "until", "retries",
            "delay", "async", "poll", "throttle", "run_once", "module_defaults", "args", "timeout", "ignore_unreachable"}


def tasks(items):
    for task in items or []:
        yield task
        for key in ("block", "rescue", "always"):
            yield from tasks(task.get(key))


uses = []  # (file, kind, name, keys)
for path in sorted(out.glob("*.yml")):
    for play in yaml.safe_load(path.read_text()) or []:
        for role in play.get("roles") or []:
            if isinstance(role, dict) and str(role.get("role", "")).startswith(PREFIX):
                uses.append((path.name, "role", role["role"][len(PREFIX):], set(role.get("vars") or {})))
        for task in tasks((play.get("pre_tasks") or []) + (play.get("tasks") or []) + (play.get("post_tasks") or [])):
            for key, value in task.items():
                if key.startswith(PREFIX) and isinstance(value, dict):
                    uses.append((path.name, "module", key[len(PREFIX):], set(value) - KEYWORDS))
modules = sorted({name for _, kind, name, _ in uses if kind == "module"})
docs = json.loads(subprocess.run([ansible_doc, "-j", *[PREFIX + m for m in modules]], check=True, capture_output=True,
                                 text=True).stdout) if modules else {}
known = {m: set(docs[PREFIX + m]["doc"].get("options", {})) for m in modules}
for role in {name for _, kind, name, _ in uses if kind == "role"}:
    spec = yaml.safe_load(pathlib.Path(f"roles/{role}/meta/argument_specs.yml").read_text())
    known[role] = set(spec["argument_specs"]["main"]["options"])
failed = False
for fname, kind, name, keys in uses:
    for key in sorted(keys - known[name]):
        print(f"{fname}: {kind} {PREFIX}{name} has no option {key!r}")
        failed = True
print(f"{len(uses)} uses of {len(known)} modules and roles checked")
sys.exit(1 if failed else 0)
PY
if compgen -G "$work/examples/*.yml" >/dev/null; then
    (cd "$work/examples" && "$VENV/bin/ansible-lint" --offline --profile production --format pep8 --exclude "$ROOT" ./*.yml) || status=1
fi
if [ "$status" -eq 0 ]; then echo "lint: ok"; else echo "lint: FAILED"; fi
exit "$status"
