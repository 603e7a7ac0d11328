#!/usr/bin/env bash
# Build the collection's documentation the way docs.ansible.com does, and fail on any warning:
#   1. changelog: `antsibull-changelog lint`, and CHANGELOG.md regenerated from
#      changelogs/changelog.yaml in a scratch copy must equal the committed one;
#   2. the guides: docs/docsite/rst/*.rst and docs/docsite/extra-docs.yml are what
#      scripts/md2rst.py writes from docs/*.md now (antsibull-docs takes extra docs as RST only);
#   3. `antsibull-docs lint-collection-docs --plugin-docs` (module/filter/role docs: schema,
#      markup, references; extra docs: labels, toctrees, rstcheck);
#   4. `antsibull-docs sphinx-init` + `antsibull-docs collection` (RST of every module, filter and
#      role, the guides) + `sphinx-build -W --keep-going` (warnings are errors).
# Offline: the collection is found through a collections tree that links to the checkout (like
# scripts/lint.sh), and the references antsibull-docs makes into the Ansible docs
# (common_return_values, ...) resolve through a small local intersphinx inventory (below) instead
# of downloading docs.ansible.com's.
#
# Usage: scripts/docs.sh [--update]
#   --update    regenerate the guides' RST and extra-docs.yml (step 2) and exit.
# Output: build/docs/html/index.html (build/ is git-ignored and not in the tarball).
# Environment: VENV (default <repo>/.venv)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$(cd "${VENV:-$ROOT/.venv}" && pwd)"
cd "$ROOT"
export PATH="$VENV/bin:$PATH"

if [ "${1:-}" = "--update" ]; then
    exec "$VENV/bin/python" scripts/md2rst.py --write
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/collections/ansible_collections/vmbackup"
ln -s "$ROOT" "$work/collections/ansible_collections/vmbackup/libvirt"
export ANSIBLE_COLLECTIONS_PATH="$work/collections"
export ANSIBLE_LOCAL_TEMP="$work/ansible-tmp" ANSIBLE_HOME="$work/ansible-home"
export ANSIBLE_NOCOLOR=1 ANSIBLE_DEPRECATION_WARNINGS=0

echo "== changelog: antsibull-changelog lint, CHANGELOG.md regenerates unchanged"
antsibull-changelog lint
mkdir -p "$work/changelog"
cp -a changelogs galaxy.yml CHANGELOG.md "$work/changelog/"
(cd "$work/changelog" && antsibull-changelog generate)
if ! cmp -s CHANGELOG.md "$work/changelog/CHANGELOG.md"; then
    diff -u CHANGELOG.md "$work/changelog/CHANGELOG.md" | head -40 || true
    echo "docs: CHANGELOG.md is not what antsibull-changelog generates from changelogs/changelog.yaml (run: antsibull-changelog generate)" >&2
    exit 1
fi

echo "== guides: docs/docsite/rst is up to date with docs/*.md"
if ! "$VENV/bin/python" scripts/md2rst.py --check; then
    echo "docs: run  bash scripts/docs.sh --update  and commit docs/docsite/" >&2
    exit 1
fi

echo "== antsibull-docs lint-collection-docs --plugin-docs"
antsibull-docs lint-collection-docs --plugin-docs --check-extra-docs-refs --validate-collection-refs all \
    --disallow-unknown-collection-refs .

echo "== antsibull-docs collection + sphinx-build -W"
site="$work/site"
mkdir -m 0700 "$site"
antsibull-docs sphinx-init --use-current --dest-dir "$site" --fail-on-error --no-add-antsibull-docs-version \
    --project vmbackup.libvirt --copyright "vmbackup.libvirt contributors" \
    --title "vmbackup.libvirt" --html-short-title "vmbackup.libvirt" vmbackup.libvirt >/dev/null
# The labels of the Ansible docs that antsibull-docs' pages link to, as a local intersphinx
# inventory pointing at docs.ansible.com (sphinx-build then needs no network). A page that links
# to a label missing here fails the build with "undefined label": add it (true targets only).
"$VENV/bin/python" - "$site/ansible_devel.inv" <<'PY'
import sys
import zlib

labels = [
    ("common_return_values", "reference_appendices/common_return_values.html#common-return-values", "Return Values"),
    ("ansible_configuration_settings", "reference_appendices/config.html#ansible-configuration-settings",
     "Ansible Configuration Settings"),
]
body = "".join(f"{name} std:label -1 {uri} {title}\n" for name, uri, title in labels)
head = "# Sphinx inventory version 2\n# Project: Ansible\n# Version: devel\n# The remainder of this file is compressed using zlib.\n"
with open(sys.argv[1], "wb") as f:
    f.write(head.encode() + zlib.compress(body.encode()))
PY
cat >>"$site/conf.py" <<PY

# scripts/docs.sh: offline, the Ansible docs' labels come from a local inventory (no download).
intersphinx_mapping = {
    'ansible_devel': ('https://docs.ansible.com/projects/ansible/devel/', '$site/ansible_devel.inv'),
}
PY
chmod og-w "$site/rst"  # antsibull-docs wants its output directory writable by itself only
antsibull-docs --config-file "$site/antsibull-docs.cfg" collection --cleanup everything --fail-on-error \
    --use-current --dest-dir "$site/rst" vmbackup.libvirt >/dev/null
out="$ROOT/build/docs"
rm -rf "$out"
mkdir -p "$out"
(cd "$site" && sphinx-build -b html -c . -W --keep-going -q -d "$work/doctrees" rst "$out/html")
echo "docs: ok ($(find "$out/html" -name '*.html' | wc -l) pages in build/docs/html)"
