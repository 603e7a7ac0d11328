"""scripts/docs.sh fails on what a reader would meet as a broken page: a module doc that points at an
option the module does not have (antsibull-docs lint), and a guide linking to a heading that does
not exist (a Sphinx warning, an error under -W). Each in a copy of the checkout; the real one
builds clean."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def copy_checkout(dest: pathlib.Path) -> None:
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for rel in listed:
        src = ROOT / rel
        if rel and src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def docs_sh(checkout: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env["VENV"] = sys.prefix
    return subprocess.run(["bash", str(checkout / "scripts" / "docs.sh"), *args], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def checkout(tmp_path) -> pathlib.Path:
    path = tmp_path / "checkout"
    copy_checkout(path)
    return path


def test_a_module_doc_pointing_at_a_missing_option_fails_the_build(checkout):
    module = checkout / "plugins" / "modules" / "verify.py"
    text = module.read_text()
    marker = "description:\n  - "
    assert marker in text
    module.write_text(text.replace(marker, marker + "See O(no_such_option). ", 1))
    proc = docs_sh(checkout)
    assert proc.returncode != 0, proc.stdout
    out = proc.stdout + proc.stderr
    assert "verify.py" in out and "O(no_such_option)" in out, out[-3000:]
    assert "sphinx-build" not in proc.stdout.split("lint-collection-docs")[-1], "the build stops at the lint"


def test_a_guide_linking_to_a_missing_heading_fails_the_build(checkout):
    guide = checkout / "docs" / "drills.md"
    guide.write_text(guide.read_text() + "\nSee [nothing](retention.md#no-such-heading).\n")
    stale = docs_sh(checkout)
    assert stale.returncode != 0 and "out of date: docs/docsite/rst/drills.rst" in stale.stderr, stale.stdout + stale.stderr
    assert docs_sh(checkout, "--update").returncode == 0
    proc = docs_sh(checkout)
    assert proc.returncode != 0, proc.stdout
    out = proc.stdout + proc.stderr
    assert "drills.rst" in out and "undefined label" in out and "retention.no-such-heading" in out, out[-3000:]
    assert "docs: ok" not in proc.stdout
