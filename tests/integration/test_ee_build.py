"""The execution environment: `ansible-builder create` of docs/examples/execution-environment.yml
(no container engine needed) and the introspection the build runs, over the collection as
installed from its tarball (what `ansible-galaxy collection install` in the build puts into the
image). The build context must name every dependency: the collection in the galaxy requirements,
the collection's own EE requirements (meta/execution-environment.yml, found by introspection of the
installed copy, so the tarball must carry them), the user's, and nothing that belongs to the
hypervisors (libvirt, qemu-img)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
VENV_BIN = pathlib.Path(sys.executable).parent
EXAMPLE = ROOT / "docs" / "examples" / "execution-environment.yml"


def requirement_lines(path: pathlib.Path) -> list[str]:
    """The requirement lines of a pip or bindep file, comments and blank lines dropped."""
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines() if line.split("#", 1)[0].strip()]


def builder(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(VENV_BIN / "ansible-builder"), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_build_context_names_every_dependency(ansible, tmp_path):
    installed = pathlib.Path(ansible.env["ANSIBLE_COLLECTIONS_PATH"])
    coll = installed / "ansible_collections" / "vmbackup" / "libvirt"
    meta = yaml.safe_load((coll / "meta" / "execution-environment.yml").read_text())
    assert meta["version"] == 1
    own_pip = requirement_lines(coll / meta["dependencies"]["python"])
    own_bindep = requirement_lines(coll / meta["dependencies"]["system"])
    assert own_pip == requirement_lines(ROOT / "meta" / "ee-requirements.txt") and own_pip
    assert own_bindep == requirement_lines(ROOT / "meta" / "ee-bindep.txt") and own_bindep

    # ansible-builder create: the context and its Containerfile.
    ctx = tmp_path / "context"
    builder("create", "-f", str(EXAMPLE), "-c", str(ctx), "--output-filename", "Containerfile", cwd=tmp_path)
    containerfile = (ctx / "Containerfile").read_text()
    spec = yaml.safe_load(EXAMPLE.read_text())
    assert spec["version"] == 3
    assert f'ARG EE_BASE_IMAGE="{spec["images"]["base_image"]["name"]}"' in containerfile
    assert f'ARG PYCMD="{spec["dependencies"]["python_interpreter"]["python_path"]}"' in containerfile
    refs = [spec["dependencies"]["ansible_core"]["package_pip"], spec["dependencies"]["ansible_runner"]["package_pip"]]
    assert f'ARG ANSIBLE_INSTALL_REFS="{" ".join(refs)}"' in containerfile
    # ansible-core pin within what the collection supports (meta/runtime.yml requires_ansible).
    requires = yaml.safe_load((ROOT / "meta" / "runtime.yml").read_text())["requires_ansible"]
    assert requires == ">=2.16.0" and refs[0].startswith("ansible-core>=2.16,")
    # The galaxy stage installs the collection; the builder stage introspects what it installed.
    galaxy = yaml.safe_load((ctx / "_build" / "requirements.yml").read_text())
    assert [c["name"] for c in galaxy["collections"]] == ["vmbackup.libvirt"], galaxy
    assert "ansible-galaxy collection install $ANSIBLE_GALAXY_CLI_COLLECTION_OPTS -r requirements.yml" in containerfile
    assert "introspect.py introspect --user-bindep=bindep.txt --write-bindep=/tmp/src/bindep.txt --write-pip=/tmp/src/requirements.txt" in containerfile
    user_bindep = requirement_lines(ctx / "_build" / "bindep.txt")
    assert user_bindep == spec["dependencies"]["system"], user_bindep
    assert not (ctx / "_build" / "requirements.txt").exists()  # no user Python requirement in the example

    # The build's introspection step, run here with the context's own script over the installed collection.
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, str(ctx / "_build" / "scripts" / "introspect.py"), "introspect", str(installed),
                           f"--user-bindep={ctx / '_build' / 'bindep.txt'}", f"--write-bindep={out / 'bindep.txt'}",
                           f"--write-pip={out / 'requirements.txt'}"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pip = (out / "requirements.txt").read_text().splitlines()
    bindep = (out / "bindep.txt").read_text().splitlines()
    assert sorted(pip) == sorted(f"{r}  # from collection vmbackup.libvirt" for r in own_pip), pip
    assert sorted(bindep) == sorted([f"{r}  # from collection vmbackup.libvirt" for r in own_bindep]
                                    + [f"{r}  # from collection user" for r in user_bindep]), bindep
    # The controller needs an SSH client; the hypervisors' requirements stay out of the EE.
    assert any(line.startswith("openssh-clients [platform:rpm]") for line in bindep)
    assert not [line for line in pip + bindep if "libvirt" in line.split("#")[0] or "qemu" in line.split("#")[0]]

    # ansible-builder introspect (the CLI collection authors use) reports the same.
    report = yaml.safe_load(builder("introspect", str(installed), cwd=tmp_path).stdout)
    assert sorted(report["python"]) == sorted(f"{r}  # from collection vmbackup.libvirt" for r in own_pip), report
    assert sorted(report["system"]) == sorted(f"{r}  # from collection vmbackup.libvirt" for r in own_bindep), report
