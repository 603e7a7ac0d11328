# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Packaging truth: the licence the headers cite exists, and the tarball holds what runs on a host."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tarfile

ROOT = pathlib.Path(__file__).resolve().parents[3]


def test_every_cited_license_file_exists():
    cited = set()
    for path in list((ROOT / "plugins").rglob("*.py")) + list((ROOT / "tests").rglob("*.py")):
        cited.update(re.findall(r"see (LICENSES/[\w.-]+)", path.read_text(encoding="utf-8")))
    assert cited, "no licence header found"
    for rel in cited:
        assert (ROOT / rel).is_file(), f"headers cite {rel}, which does not exist"
        assert "GNU GENERAL PUBLIC LICENSE" in (ROOT / rel).read_text(encoding="utf-8")


def test_tarball_holds_plugins_and_docs_but_not_tests_scripts_or_benchmarks(tmp_path):
    galaxy = pathlib.Path(sys.executable).parent / "ansible-galaxy"
    subprocess.run([str(galaxy), "collection", "build", "--force", "--output-path", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, text=True)
    (tarball,) = tmp_path.glob("vmbackup-libvirt-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    tops = {name.split("/", 1)[0] for name in names}
    for wanted in ("plugins/modules/export.py", "plugins/modules/restore.py", "plugins/modules/verify.py",
                   "LICENSES/GPL-3.0-or-later.txt", "docs/error-codes.md", "meta/runtime.yml", "playbooks/demo.yml"):
        assert wanted in names, wanted
    assert not tops & {"tests", "scripts", "benchmarks", ".venv", ".git", "requirements"}, sorted(tops)
    assert not any("__pycache__" in name for name in names)


def test_test_file_names_are_unique():
    """pytest imports test files by basename (no __init__.py): two of one name stop the whole run."""
    root = pathlib.Path(__file__).resolve().parents[2]
    names = [p.name for p in root.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
