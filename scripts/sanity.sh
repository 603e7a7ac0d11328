#!/usr/bin/env bash
# Run `ansible-test sanity` on this collection without Docker.
#
# Usage: scripts/sanity.sh [extra ansible-test sanity args...]
#   e.g. scripts/sanity.sh --test validate-modules
#        scripts/sanity.sh --test pylint plugins/modules/export.py
#
# Environment:
#   VENV            virtualenv holding ansible-core/ansible-test (default: <repo>/.venv)
#   PYTHON_VERSION  Python version to test with (default: 3.11)
#   SANITY_WORKDIR  scratch root (default: ${TMPDIR:-/tmp}/vmbackup-sanity-<hash of the checkout path>); wiped on each run
#
# How it works:
#   * ansible-test insists on running from .../ansible_collections/<ns>/<name> (real path,
#     symlinks are resolved), so the working tree is copied there: tracked files as they are
#     in the working tree (uncommitted edits included, deleted files skipped) plus untracked
#     files that are not git-ignored. No .git is created in the copy: ansible-test then lists
#     files by walking the directory, which is exactly the copied set.
#   * Unless an environment option is given, tests run with `--venv --python $PYTHON_VERSION`:
#     ansible-test builds one virtualenv per test (cached in ~/.ansible/test/venv) and pip
#     installs its pinned requirements from PyPI.
#   * To bootstrap pip in those venvs ansible-test runs ~/.ansible/test/cache/get_pip_<ver>.py
#     and, if absent, downloads it from the ansible-test CI file server (unreachable here).
#     A small stand-in is written there (only if no real get-pip script is present) that
#     uses ensurepip and then `pip install`s the requested pip version.
#   * ansible-test's results stay in the scratch copy (<copy>/tests/output); nothing is
#     written to the repository.
# Exit status: that of ansible-test.

set -euo pipefail

REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
VENV=${VENV:-$REPO/.venv}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
# One scratch root per checkout, so that runs from two worktrees do not wipe each other.
WORKROOT=${SANITY_WORKDIR:-${TMPDIR:-/tmp}/vmbackup-sanity-$(printf %s "$REPO" | sha256sum | cut -c1-8)}

ANSIBLE_TEST=$VENV/bin/ansible-test
VENV_PYTHON=$VENV/bin/python
if [[ ! -x $ANSIBLE_TEST || ! -x $VENV_PYTHON ]]; then
    echo "sanity.sh: $ANSIBLE_TEST not found; set VENV to a virtualenv with ansible-core" >&2
    exit 2
fi

galaxy_field() {
    sed -n -E "s/^$1:[[:space:]]*['\"]?([A-Za-z0-9_]+)['\"]?[[:space:]]*(#.*)?$/\1/p" "$REPO/galaxy.yml" | head -n1
}
NAMESPACE=$(galaxy_field namespace)
NAME=$(galaxy_field name)
if [[ -z $NAMESPACE || -z $NAME ]]; then
    echo "sanity.sh: could not read namespace/name from $REPO/galaxy.yml" >&2
    exit 2
fi

# --- 1. pip bootstrap stand-in -------------------------------------------------------------
# The file name is derived from the pip version ansible-test pins for its venvs, read from the
# installed ansible-test itself (get_venv_packages(), e.g. pip 24.2 -> get_pip_24_2.py).
PIP_VERSION=$("$VENV_PYTHON" - <<'EOF'
import re, pathlib, ansible_test
src = (pathlib.Path(ansible_test.__file__).parent / '_internal' / 'python_requirements.py').read_text()
m = re.search(r"default_packages\s*=\s*dict\(\s*pip='([^']+)'", src)
print(m.group(1) if m else '')
EOF
)
if [[ -z $PIP_VERSION ]]; then
    echo "sanity.sh: could not determine the pip version pinned by ansible-test" >&2
    exit 2
fi
GET_PIP=$HOME/.ansible/test/cache/get_pip_${PIP_VERSION//./_}.py
STANDIN_MARKER='vmbackup-sanity get-pip stand-in v1'
if [[ ! -e $GET_PIP ]] || { grep -q 'vmbackup-sanity get-pip stand-in' "$GET_PIP" && ! grep -qF "$STANDIN_MARKER" "$GET_PIP"; }; then
    mkdir -p -- "$(dirname -- "$GET_PIP")"
    tmp=$(mktemp "$GET_PIP.XXXXXX")
    cat >"$tmp" <<EOF
# $STANDIN_MARKER (written by scripts/sanity.sh of ${NAMESPACE}.${NAME}).
# Replaces the get-pip-${PIP_VERSION}.py of the ansible-test CI file server, which
# cannot be downloaded here: bootstrap pip with ensurepip, then pip-install the arguments
# ansible-test passes (e.g. pip==${PIP_VERSION}). get-pip-only options are dropped.
import subprocess
import sys

GET_PIP_ONLY = {'--no-setuptools', '--no-wheel', '--no-pip'}

def main():
    args = [a for a in sys.argv[1:] if a not in GET_PIP_ONLY]
    subprocess.check_call([sys.executable, '-m', 'ensurepip', '--default-pip'])
    if any(not a.startswith('-') for a in args):
        subprocess.check_call([sys.executable, '-m', 'pip', 'install'] + args)

if __name__ == '__main__':
    main()
EOF
    chmod 0644 "$tmp"
    mv -f -- "$tmp" "$GET_PIP"
fi

# --- 2. copy the working tree into an ansible_collections layout -------------------------------
COPY=$WORKROOT/ansible_collections/$NAMESPACE/$NAME
case $WORKROOT in
    ''|/) echo "sanity.sh: refusing to use '$WORKROOT' as scratch root" >&2; exit 2 ;;
esac
rm -rf -- "$WORKROOT"
mkdir -p -- "$COPY"

file_list() {
    if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # tracked (working-tree content) + untracked-not-ignored, minus deleted files
        git -C "$REPO" ls-files -z --cached --others --exclude-standard
    else
        (cd -- "$REPO" && find . \( -name .git -o -name .venv -o -name __pycache__ -o -path ./tests/output \) -prune \
            -o \( -type f -o -type l \) -printf '%P\0')
    fi
}
file_list | while IFS= read -r -d '' f; do
    case $f in
        .venv/*|.git/*|tests/output/*|*/__pycache__/*|__pycache__/*|*.pyc) continue ;;
    esac
    [[ -e $REPO/$f || -L $REPO/$f ]] && printf '%s\0' "$f"
done | (cd -- "$REPO" && tar --null --no-recursion -T - -cf -) | tar -xf - -C "$COPY"

# --- 3. run ansible-test -----------------------------------------------------------------------
env_opts=(--venv)
python_opts=(--python "$PYTHON_VERSION")
for a in "$@"; do
    case $a in
        --local|--venv|--docker|--docker=*|--remote|--remote=*|--controller|--controller=*|--target|--target=*)
            env_opts=(); python_opts=() ;;
        --python|--python=*|--python-interpreter|--python-interpreter=*|--target-python|--target-python=*)
            python_opts=() ;;
    esac
done

echo "sanity.sh: running ansible-test sanity in $COPY" >&2
cd -- "$COPY"
set +e
PATH=$VENV/bin:$PATH "$ANSIBLE_TEST" sanity "${env_opts[@]}" "${python_opts[@]}" "$@"
rc=$?
set -e
echo "sanity.sh: ansible-test exited with $rc; results in $COPY/tests/output" >&2
exit "$rc"
