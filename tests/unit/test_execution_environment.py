"""The execution environment requirements (meta/execution-environment.yml, meta/ee-*.txt) are true
to what runs where: derived here from the code, not from the files themselves.

- Controller side (the EE): the filter plugins, the tasks of the playbooks' `hosts: localhost` plays
  (include_role / include_tasks followed), and the modules that are meant to run on localhost in
  AWX (policy_check reads a repository mounted into the job container). Every third-party Python
  import of that code (transitively through the collection's module_utils) is in
  meta/ee-requirements.txt; zoneinfo (IANA zones) needs tzdata; SSH to the hypervisors needs a client.
- Hypervisor side: every other module. Its third-party imports (libvirt) are NOT in the EE, and
  docs/awx.md names them as hypervisor requirements.
- No task of a role is delegated to the controller (delegate_to / local_action / connection), and
  no role or playbook uses json_query: otherwise their needs would be the EE's too.
"""

from __future__ import annotations

import ast
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
PKG = "ansible_collections.vmbackup.libvirt.plugins.module_utils"
# Import name -> pip / distribution name.
PIP_NAME = {"jmespath": "jmespath", "libvirt": "libvirt-python", "libvirt_qemu": "libvirt-python"}
# Modules that run on localhost (the EE) in the documented AWX setup, besides the localhost plays'.
CONTROLLER_MODULES = {"policy_check"}
# Playbooks a job template runs (docs/awx.md); demo.yml is a local demo whose localhost is a hypervisor.
AWX_PLAYBOOKS = ["backup_weekly.yml", "backup_monthly.yml", "restore.yml", "drill.yml", "verify.yml", "policy_check.yml"]
# Task keywords that are not a module (or whose value is no module name).
KEYWORDS = {"name", "vars", "when", "loop", "loop_control", "register", "block", "rescue", "always", "tags",
            "ignore_errors", "ignore_unreachable", "changed_when", "failed_when", "until", "retries", "delay",
            "check_mode", "diff", "no_log", "throttle", "run_once", "async", "poll", "become", "become_user",
            "environment", "notify", "listen", "any_errors_fatal", "delegate_to", "delegate_facts", "local_action",
            "connection", "with_items", "args", "timeout", "module_defaults", "collections"}


def requirement_names(path: pathlib.Path) -> set[str]:
    out = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower())
    return out


def third_party_imports(path: pathlib.Path, seen: set[pathlib.Path] | None = None) -> set[str]:
    """Top-level names of the non-stdlib, non-Ansible imports of a plugin file, following the
    collection's own module_utils."""
    seen = set() if seen is None else seen
    if path in seen:
        return set()
    seen.add(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == PKG:
                for a in node.names:
                    found |= third_party_imports(ROOT / "plugins" / "module_utils" / f"{a.name}.py", seen)
                continue
            if node.module.startswith(PKG + "."):
                found |= third_party_imports(ROOT / "plugins" / "module_utils" / f"{node.module.rsplit('.', 1)[1]}.py", seen)
                continue
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in ("ansible", "ansible_collections", "__future__"):
                found.add(top)
    return found


def stdlib_imports(path: pathlib.Path) -> set[str]:
    """Like third_party_imports, for standard library names (zoneinfo needs the system's tzdata)."""
    found: set[str] = set()
    files = {path}
    text = path.read_text()
    for mod in re.findall(rf"from {re.escape(PKG)}(?:\.(\w+))? import (\w+)", text):
        files.add(ROOT / "plugins" / "module_utils" / f"{mod[0] or mod[1]}.py")
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found & set(sys.stdlib_module_names)


def tasks_of(tasks: list, role_dir: pathlib.Path | None, seen: set) -> list[dict]:
    """Every task of a task list, include_tasks / include_role / import_role followed."""
    out: list[dict] = []
    for task in tasks or []:
        out.append(task)
        for key in ("block", "rescue", "always"):
            if key in task:
                out += tasks_of(task[key], role_dir, seen)
        for key in ("ansible.builtin.include_tasks", "ansible.builtin.import_tasks", "include_tasks", "import_tasks"):
            if key in task and role_dir is not None:
                file = task[key] if isinstance(task[key], str) else task[key]["file"]
                out += load_tasks(role_dir / "tasks" / file, role_dir, seen)
        for key in ("ansible.builtin.include_role", "ansible.builtin.import_role", "include_role", "import_role"):
            if key in task:
                role = ROOT / "roles" / task[key]["name"].split(".")[-1]
                tasks_from = task[key].get("tasks_from", "main")
                out += load_tasks(role / "tasks" / (tasks_from if tasks_from.endswith(".yml") else f"{tasks_from}.yml"), role, seen)
    return out


def load_tasks(path: pathlib.Path, role_dir: pathlib.Path, seen: set) -> list[dict]:
    if path in seen:
        return []
    seen.add(path)
    return tasks_of(yaml.safe_load(path.read_text()), role_dir, seen)


def module_of(task: dict) -> str | None:
    keys = [k for k in task if k not in KEYWORDS and not k.startswith("with_")]
    return keys[0] if keys else None


def needs(module: str) -> dict[str, bool]:
    """needs_libvirt / needs_qemu_img of a module's run_module() call (both default to True)."""
    flags = {"needs_libvirt": True, "needs_qemu_img": True}
    for node in ast.walk(ast.parse((ROOT / "plugins" / "modules" / f"{module}.py").read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_module":
            flags.update({k.arg: k.value.value for k in node.keywords if k.arg in flags})
            return flags
    return {"needs_libvirt": False, "needs_qemu_img": False}  # a module without the collection's backend


def delegated(tasks: list, inherited: bool = False) -> list[dict]:
    """The tasks of a play's task list that are delegated to localhost (a block's delegate_to included)."""
    out = []
    for task in tasks or []:
        here = inherited or task.get("delegate_to") in ("localhost", "127.0.0.1") or "local_action" in task
        if here and not any(k in task for k in ("block", "rescue", "always")):
            out.append(task)
        for key in ("block", "rescue", "always"):
            out += delegated(task.get(key), here)
    return out


def controller_modules() -> dict[str, set[str]]:
    """module -> where: the modules the localhost plays of the AWX playbooks run, their tasks
    delegated to localhost, plus CONTROLLER_MODULES."""
    found: dict[str, set[str]] = {}
    for name in AWX_PLAYBOOKS:
        path = ROOT / "playbooks" / name
        assert path.exists(), path
        for play in yaml.safe_load(path.read_text()):
            for task in delegated(play.get("tasks", [])):
                found.setdefault(module_of(task), set()).add(f"{name}: {task['name']} (delegated to localhost)")
            if play.get("hosts") != "localhost":
                continue
            seen: set = set()
            tasks = tasks_of(play.get("tasks", []), None, seen)
            for role in play.get("roles", []):
                role_dir = ROOT / "roles" / (role["role"] if isinstance(role, dict) else role).split(".")[-1]
                tasks += load_tasks(role_dir / "tasks" / "main.yml", role_dir, seen)
            for task in tasks:
                module = module_of(task)
                if module:
                    found.setdefault(module, set()).add(f"{name}: {play['name']}")
    for module in CONTROLLER_MODULES:
        found.setdefault(f"vmbackup.libvirt.{module}", set()).add("may run on localhost (docs/awx.md)")
    return found


def test_meta_points_at_the_requirement_files():
    meta = yaml.safe_load((ROOT / "meta" / "execution-environment.yml").read_text())
    assert meta == {"version": 1, "dependencies": {"python": "meta/ee-requirements.txt", "system": "meta/ee-bindep.txt"}}


def test_controller_side_imports_are_ee_requirements():
    pip = requirement_names(ROOT / "meta" / "ee-requirements.txt")
    needed: dict[str, str] = {}
    for plugin in sorted((ROOT / "plugins" / "filter").glob("*.py")):
        for name in third_party_imports(plugin):
            needed[PIP_NAME.get(name, name)] = f"filter {plugin.name}"
    modules = controller_modules()
    # The backup summary play and the policy check's reports must have been found (else this test checks nothing).
    assert "ansible.builtin.set_stats" in modules and "ansible.builtin.copy" in modules, modules
    assert "vmbackup.libvirt.policy_check" in modules, modules
    for module, where in sorted(modules.items()):
        if module.startswith("ansible.builtin."):
            continue  # ansible-core itself
        assert module.startswith("vmbackup.libvirt."), (module, where)  # no other collection is a dependency
        short = module.rsplit(".", 1)[1]
        # libvirt (and qemu-img) only where run_module() asks for them; the import itself is guarded.
        assert needs(short) == {"needs_libvirt": False, "needs_qemu_img": False}, (module, where)
        for name in third_party_imports(ROOT / "plugins" / "modules" / f"{short}.py") - {"libvirt", "libvirt_qemu"}:
            needed[PIP_NAME.get(name, name)] = f"module {module} ({', '.join(sorted(where))})"
    missing = {k: v for k, v in needed.items() if k.lower() not in pip}
    assert not missing, f"controller-side imports missing from meta/ee-requirements.txt: {missing}"


def test_hypervisor_requirements_stay_out_of_the_ee():
    pip = requirement_names(ROOT / "meta" / "ee-requirements.txt")
    bindep = requirement_names(ROOT / "meta" / "ee-bindep.txt")
    controller = {m.rsplit(".", 1)[1] for m in controller_modules() if m.startswith("vmbackup.libvirt.")}
    hypervisor = [m.stem for m in sorted((ROOT / "plugins" / "modules").glob("*.py")) if m.stem not in controller]
    assert "export" in hypervisor and all(needs(m)["needs_libvirt"] for m in ("export", "restore", "drill", "snapshot"))
    assert "libvirt-python" not in pip and "libvirt" not in pip
    assert not [b for b in bindep if "libvirt" in b or "qemu" in b], bindep
    # Documented as the hypervisors' requirements instead.
    awx = (ROOT / "docs" / "awx.md").read_text()
    for word in ("libvirt-python", "python3-libvirt", "qemu-img"):
        assert word in awx, word


def test_system_requirements_of_the_controller():
    bindep = requirement_names(ROOT / "meta" / "ee-bindep.txt")
    assert {"openssh-clients", "openssh-client"} <= bindep  # rpm and dpkg names: SSH to the hypervisors
    zone_users = [p.name for p in (ROOT / "plugins" / "filter").glob("*.py") if "zoneinfo" in stdlib_imports(p)]
    assert zone_users, "the retention filter evaluates IANA zones on the controller"
    assert "tzdata" in bindep, zone_users


def test_no_role_task_runs_on_the_controller():
    offenders = []
    for path in sorted((ROOT / "roles").glob("*/tasks/*.yml")):
        for task in tasks_of(yaml.safe_load(path.read_text()), None, set()):
            if {"delegate_to", "local_action", "connection"} & set(task):
                offenders.append(f"{path.relative_to(ROOT)}: {task.get('name')}")
    assert not offenders, offenders
    for path in sorted(list((ROOT / "roles").rglob("*.yml")) + list((ROOT / "playbooks").glob("*.yml")) + list((ROOT / "roles").rglob("*.j2"))):
        assert "json_query" not in path.read_text(), f"{path}: json_query needs jmespath on the controller (meta/ee-requirements.txt)"
