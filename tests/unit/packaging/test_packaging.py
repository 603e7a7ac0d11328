# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Packaging truth: the licence the headers cite exists, the tarball holds what runs on a host and
its docs (and nothing of the development checkout), the changelog is what antsibull-changelog makes
of changelogs/changelog.yaml, every plugin's version_added matches the release that brought it, and
every sanity ignore line says why."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[3]
VENV_BIN = pathlib.Path(sys.executable).parent


def galaxy() -> dict:
    return yaml.safe_load((ROOT / "galaxy.yml").read_text(encoding="utf-8"))


@dataclasses.dataclass
class Tarball:
    members: dict[str, tarfile.TarInfo]
    manifest: dict
    files: dict


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> Tarball:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([str(VENV_BIN / "ansible-galaxy"), "collection", "build", "--force", "--output-path", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True)
    (path,) = out.glob("vmbackup-libvirt-*.tar.gz")
    assert path.name == f"vmbackup-libvirt-{galaxy()['version']}.tar.gz"
    with tarfile.open(path) as tar:
        return Tarball(members={m.name: m for m in tar.getmembers()},
                       manifest=json.load(tar.extractfile("MANIFEST.json")),
                       files=json.load(tar.extractfile("FILES.json")))


def test_every_cited_license_file_exists():
    cited = set()
    for path in list((ROOT / "plugins").rglob("*.py")) + list((ROOT / "tests").rglob("*.py")):
        cited.update(re.findall(r"see (LICENSES/[\w.-]+)", path.read_text(encoding="utf-8")))
    assert cited, "no licence header found"
    for rel in cited:
        assert (ROOT / rel).is_file(), f"headers cite {rel}, which does not exist"
        assert "GNU GENERAL PUBLIC LICENSE" in (ROOT / rel).read_text(encoding="utf-8")


def test_tarball_holds_plugins_and_docs_but_not_tests_scripts_or_benchmarks(tarball):
    names = set(tarball.members)
    tops = {name.split("/", 1)[0] for name in names}
    for wanted in ("plugins/modules/export.py", "plugins/modules/restore.py", "plugins/modules/verify.py",
                   "LICENSES/GPL-3.0-or-later.txt", "docs/error-codes.md", "meta/runtime.yml", "playbooks/demo.yml",
                   "README.md", "CHANGELOG.md", "changelogs/changelog.yaml", "changelogs/config.yaml",
                   "docs/docsite/extra-docs.yml", "docs/docsite/links.yml", "docs/docsite/rst/repository-format.rst",
                   "roles/backup/meta/argument_specs.yml", "MANIFEST.json", "FILES.json"):
        assert wanted in names, wanted
    for kind in ("modules", "filter", "module_utils", "doc_fragments"):
        for path in (ROOT / "plugins" / kind).glob("*.py"):
            assert f"plugins/{kind}/{path.name}" in names, path
    for path in list((ROOT / "playbooks").glob("*.yml")) + list((ROOT / "docs").glob("*.md")):
        assert path.relative_to(ROOT).as_posix() in names, path
    assert not tops & {"tests", "scripts", "benchmarks", ".venv", ".git", "requirements", "build", ".ci", "collections"}, sorted(tops)
    assert not any("__pycache__" in name or name.endswith((".pyc", ".tar.gz")) for name in names)
    assert not names & {"pytest.ini", ".gitignore", ".ansible-lint", "changelogs/.plugin-cache.yaml", "changelogs/fragments/.keep"}
    # No symlinks or hard links (an installed copy must not point anywhere).
    assert not [m.name for m in tarball.members.values() if m.issym() or m.islnk()]


def test_tarball_is_exactly_the_tracked_files_minus_build_ignore(tarball):
    """Compared with git's view of the checkout: nothing shipped that git does not know (a stray
    local file), nothing tracked left out that build_ignore does not name."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True, text=True).stdout.split("\0")
    patterns = galaxy()["build_ignore"]

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        # As ansible-galaxy matches: each pattern against the path relative to the collection root of
        # every directory and file on the way (so "collections" is the top-level directory only).
        return any(fnmatch.fnmatch(p, pat) for pat in patterns for p in prefixes)

    expected = {rel for rel in listed if rel and (ROOT / rel).is_file() and not ignored(rel)} - {"galaxy.yml"}
    files = {name for name, m in tarball.members.items() if m.isfile()} - {"MANIFEST.json", "FILES.json"}
    assert sorted(files - expected) == [], "shipped but not tracked (or build_ignore misses it)"
    assert sorted(expected - files) == [], "tracked but not shipped"
    # FILES.json (what ansible-galaxy verifies an installed copy against) lists the same files.
    assert {f["name"] for f in tarball.files["files"] if f["ftype"] == "file"} - {"MANIFEST.json"} == files


def test_manifest_is_true_to_galaxy_yml(tarball):
    info = tarball.manifest["collection_info"]
    meta = galaxy()
    assert (info["namespace"], info["name"], info["version"]) == (meta["namespace"], meta["name"], meta["version"])
    assert info["license"] == ["GPL-3.0-or-later"]
    # URLs only if true: the collection has no public repository, issue tracker or docs site (yet).
    for key in ("repository", "documentation", "homepage", "issues"):
        assert not meta.get(key), f"galaxy.yml {key}: only with a real address"


# ----------------------------------------------------------------------------- changelog
def released() -> dict:
    return yaml.safe_load((ROOT / "changelogs" / "changelog.yaml").read_text(encoding="utf-8"))["releases"]


def test_changelog_lints_and_regenerates_unchanged(tmp_path):
    tool = str(VENV_BIN / "antsibull-changelog")
    lint = subprocess.run([tool, "lint"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copytree(ROOT / "changelogs", copy / "changelogs")
    shutil.copy(ROOT / "galaxy.yml", copy)
    (copy / "CHANGELOG.md").write_text("stale\n")
    subprocess.run([tool, "generate"], cwd=copy, check=True, capture_output=True, text=True)
    assert (copy / "CHANGELOG.md").read_text() == (ROOT / "CHANGELOG.md").read_text(), \
        "CHANGELOG.md is not what `antsibull-changelog generate` makes of changelogs/changelog.yaml"


def test_the_next_version_is_newer_than_every_release():
    def key(version: str) -> tuple[int, ...]:
        return tuple(int(p) for p in version.split("."))
    versions = sorted(released(), key=key)
    assert versions and versions[0] == "0.1.0"
    assert key(galaxy()["version"]) > key(versions[-1]), "galaxy.yml must name the next, unreleased version"
    assert "release_summary" in released()[versions[-1]]["changes"]


def plugin_docs() -> list[tuple[str, str, str]]:
    """(type, name, version_added) of every module and filter."""
    out = []
    for path in sorted((ROOT / "plugins" / "modules").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        doc = re.search(r'^DOCUMENTATION = r?(\'\'\'|""")(.*?)\1', text, re.S | re.M)
        assert doc, path
        out.append(("module", path.stem, str(yaml.safe_load(doc.group(2)).get("version_added"))))
    for path in sorted((ROOT / "plugins" / "filter").glob("*.yml")):
        out.append(("filter", path.stem, str(yaml.safe_load(path.read_text(encoding="utf-8"))["DOCUMENTATION"].get("version_added"))))
    return out


def test_version_added_is_the_release_that_brought_the_plugin():
    """A plugin the changelog lists as new in a release says that release; one not yet released
    says the next version (galaxy.yml), which is where the changelog will list it."""
    introduced: dict[tuple[str, str], str] = {}
    for version, release in released().items():
        for module in release.get("modules", []):
            introduced[("module", module["name"])] = version
        for kind, plugins in release.get("plugins", {}).items():
            for plugin in plugins:
                introduced[(kind, plugin["name"])] = version
    docs = plugin_docs()
    assert {("module", "export"), ("filter", "retention_preview")} <= {(k, n) for k, n, dummy in docs}
    wrong = [(kind, name, added, introduced.get((kind, name), galaxy()["version"]))
             for kind, name, added in docs if added != introduced.get((kind, name), galaxy()["version"])]
    assert wrong == [], "(type, name, version_added, expected)"


# ----------------------------------------------------------------------------- docs
def test_the_guides_rst_is_generated_from_the_markdown():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import md2rst  # pylint: disable=import-outside-toplevel
    finally:
        sys.path.pop(0)
    assert md2rst.stale_files(ROOT) == [], "run: python scripts/md2rst.py --write"
    index = yaml.safe_load((ROOT / "docs" / "docsite" / "extra-docs.yml").read_text(encoding="utf-8"))
    listed = [ref for section in index["sections"] for ref in section["toctree"]]
    assert sorted(listed) == sorted(p.stem for p in (ROOT / "docs").glob("*.md")), "every guide is in the docs, once"


# ----------------------------------------------------------------------------- sanity ignores
IGNORE_LINE = re.compile(r"^\S+ \S+ # \S.*$")


def lines_without_reason(text: str) -> list[str]:
    return [line for line in text.splitlines() if not IGNORE_LINE.match(line)]


def test_a_sanity_ignore_line_needs_its_reason():
    assert lines_without_reason("plugins/modules/x.py validate-modules:doc-missing-type # the type is checked at run time\n") == []
    assert lines_without_reason("plugins/modules/x.py pylint:unused-import\n") == ["plugins/modules/x.py pylint:unused-import"]
    assert lines_without_reason("plugins/modules/x.py pylint:unused-import #\n") != []
    files = sorted((ROOT / "tests" / "sanity").glob("*.txt")) if (ROOT / "tests" / "sanity").is_dir() else []
    for path in files:
        assert path.name.startswith("ignore-") or path.name.startswith("extra"), path
        assert lines_without_reason(path.read_text(encoding="utf-8")) == [], f"{path.name}: every line is `path test # reason`"


def test_test_file_names_are_unique():
    """pytest imports test files by basename (no __init__.py): two of one name stop the whole run."""
    root = pathlib.Path(__file__).resolve().parents[2]
    names = [p.name for p in root.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
