"""Real-libvirt test harness: throwaway domains, patterns written through the QEMU monitor,
modules run the way users run them (the `ansible` CLI against localhost), and independent
checks with qemu-img.

Nothing here imports the collection: results are checked by another path than the module's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import typing as t
import uuid
import xml.etree.ElementTree as ET
from xml.sax import saxutils

import libvirt
import libvirt_qemu

URI = "qemu:///system"
# Errors are checked through exceptions; keep libvirt's default handler from printing them too.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
IMAGES = pathlib.Path("/var/lib/libvirt/images")
PREFIX = "vmbt-"
MIB = 1024 * 1024


def run(argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


# ----------------------------------------------------------------------------- ansible
@dataclasses.dataclass
class AnsibleRunner:
    """Runs a module of the installed collection on localhost through the `ansible` CLI."""

    env: dict[str, str]
    ansible: str

    def argv(self, module: str, args: dict[str, t.Any], check: bool = False) -> list[str]:
        argv = [self.ansible, "localhost", "-m", f"vmbackup.libvirt.{module}", "-a", json.dumps(args)]
        if check:
            argv.append("--check")
        return argv

    def __call__(self, module: str, args: dict[str, t.Any], check: bool = False, timeout: float = 600) -> dict[str, t.Any]:
        proc = subprocess.run(self.argv(module, args, check), env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=False)
        return parse_result(proc.stdout, proc.stderr)

    def popen_result(self, module: str, args: dict[str, t.Any]) -> "Pending":
        """Start a module run in the background; .result() waits for and parses it."""
        proc = subprocess.Popen(self.argv(module, args), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return Pending(proc)

    def popen(self, module: str, args: dict[str, t.Any]) -> subprocess.Popen:
        return subprocess.Popen(self.argv(module, args), env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclasses.dataclass
class Pending:
    proc: subprocess.Popen

    def result(self, timeout: float) -> dict[str, t.Any]:
        out, err = self.proc.communicate(timeout=timeout)
        return parse_result(out, err)


_RESULT_RE = re.compile(r"^localhost \| (SUCCESS|CHANGED|FAILED!?) => (\{.*)", re.S | re.M)


def parse_result(stdout: str, stderr: str = "") -> dict[str, t.Any]:
    match = _RESULT_RE.search(stdout)
    if not match:
        raise AssertionError(f"no module result in output:\nstdout:\n{stdout}\nstderr:\n{stderr}")
    result = json.JSONDecoder().raw_decode(match.group(2))[0]
    result.setdefault("failed", match.group(1).startswith("FAILED"))
    return result


def build_and_install(root: pathlib.Path, workdir: pathlib.Path) -> dict[str, str]:
    """Build the collection tarball and install it: what users get is what the tests run."""
    venv_bin = pathlib.Path(sys.executable).parent
    galaxy = str(venv_bin / "ansible-galaxy")
    out = workdir / "dist"
    coll = workdir / "collections"
    run([galaxy, "collection", "build", "--force", "--output-path", str(out), str(root)])
    tarball = next(out.glob("vmbackup-libvirt-*.tar.gz"))
    run([galaxy, "collection", "install", "--force", "-p", str(coll), str(tarball)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(coll),
        ANSIBLE_STDOUT_CALLBACK="minimal",
        ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
        ANSIBLE_HOST_KEY_CHECKING="0",
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_LOCAL_TEMP=str(workdir / "ansible-tmp"),
    )
    return env


# ----------------------------------------------------------------------------- domains
@dataclasses.dataclass
class DiskSpec:
    size: str = "64M"
    fmt: str = "qcow2"
    # (pattern byte, offset, length) written into the image before the domain starts
    fill: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Vm:
    conn: t.Any
    dom: t.Any
    name: str
    workdir: pathlib.Path
    disks: dict[str, pathlib.Path]  # target -> image path
    formats: dict[str, str]

    @property
    def uuid(self) -> str:
        return self.dom.UUIDString()

    def write(self, target: str, pattern: int, offset: str, length: str) -> None:
        """Write through the running QEMU, as a guest would: dirties the bitmaps."""
        device = f"/machine/peripheral/ua-{target}/virtio-backend"
        for cmd in (f"write -P {pattern:#x} {offset} {length}", "flush"):
            out = libvirt_qemu.qemuMonitorCommand(self.dom, f'qemu-io -d {device} "{cmd}"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
            assert "error" not in out.lower() and "failed" not in out.lower(), out

    def snapshot_disk(self, target: str, dest: pathlib.Path) -> pathlib.Path:
        """A reference copy of the disk as it is now (after a flush), read from outside QEMU."""
        run(["qemu-img", "convert", "-U", "-f", self.formats[target], "-O", "qcow2", str(self.disks[target]), str(dest)])
        return dest

    def checkpoints(self) -> list[str]:
        return sorted(cp.getName() for cp in self.dom.listAllCheckpoints(0))


class VmFactory:
    def __init__(self, conn, domain_type: str) -> None:
        self.conn = conn
        self.domain_type = domain_type
        self.vms: list[Vm] = []

    def create(self, disks: list[DiskSpec] | None = None, running: bool = True, name: str | None = None,
               cdrom: bool = False) -> Vm:
        disks = disks or [DiskSpec()]
        token = uuid.uuid4().hex[:10]
        workdir = IMAGES / f"{PREFIX}{token}"
        workdir.mkdir(mode=0o755)
        name = name if name is not None else f"{PREFIX}{token}"
        paths, formats, disk_xml = {}, {}, []
        for i, spec in enumerate(disks):
            target = "vd" + "abcdefgh"[i]
            path = workdir / f"{target}.{spec.fmt}"
            run(["qemu-img", "create", "-q", "-f", spec.fmt, str(path), spec.size])
            for pattern, offset, length in spec.fill:
                run(["qemu-io", "-f", spec.fmt, "-c", f"write -P {pattern:#x} {offset} {length}", str(path)])
            paths[target], formats[target] = path, spec.fmt
            disk_xml.append(
                f"<disk type='file' device='disk'><driver name='qemu' type='{spec.fmt}'/>"
                f"<source file='{path}'/><target dev='{target}' bus='virtio'/><alias name='ua-{target}'/></disk>"
            )
        if cdrom:
            disk_xml.append("<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='hdc' bus='ide'/><readonly/></disk>")
        xml = (
            f"<domain type='{self.domain_type}'><name>{saxutils.escape(name)}</name><memory unit='MiB'>64</memory>"
            "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
            f"<devices>{''.join(disk_xml)}</devices></domain>"
        )
        dom = self.conn.defineXML(xml)
        vm = Vm(self.conn, dom, name, workdir, paths, formats)
        self.vms.append(vm)
        if running:
            dom.create()
        return vm

    def cleanup(self) -> None:
        for vm in self.vms:
            destroy_vm(vm.dom)
            shutil.rmtree(vm.workdir, ignore_errors=True)
        self.vms.clear()


def destroy_vm(dom) -> None:
    try:
        if dom.isActive():
            try:
                dom.abortJob()
            except libvirt.libvirtError:
                pass
            dom.destroy()
        for cp in dom.listAllCheckpoints(0):
            try:
                cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            except libvirt.libvirtError:
                pass
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                          | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    except libvirt.libvirtError:
        pass


def pick_domain_type(conn) -> str:
    """kvm where QEMU can use /dev/kvm, else TCG; proven by starting a tiny domain."""
    if not os.path.exists("/dev/kvm"):
        return "qemu"
    name = f"{PREFIX}probe-{uuid.uuid4().hex[:6]}"
    xml = (f"<domain type='kvm'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>"
           "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices/></domain>")
    try:
        dom = conn.defineXML(xml)
    except libvirt.libvirtError:
        return "qemu"
    try:
        dom.create()
        return "kvm"
    except libvirt.libvirtError:
        return "qemu"
    finally:
        destroy_vm(dom)


class Domains:
    """Names of domains a test restores or defines, and files it makes outside its directory;
    every one is destroyed, undefined or removed afterwards, also when the test fails."""

    def __init__(self, conn, hint: str = "r") -> None:
        self.conn = conn
        self.hint = hint
        self.names: list[str] = []
        self.files: list[pathlib.Path] = []

    def new_name(self, hint: str | None = None) -> str:
        name = f"{PREFIX}{hint or self.hint}-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        return name

    def lookup(self, name: str):
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError:
            return None

    def cleanup(self) -> None:
        for name in self.names:
            dom = self.lookup(name)
            if dom is not None:
                destroy_vm(dom)
        for path in self.files:
            if os.path.lexists(path):
                os.unlink(path)


def job_running(dom) -> bool:
    """Whether libvirt runs a job on the domain ("backup job data missing" while one starts: no)."""
    try:
        return dom.jobStats(0).get("type", 0) != 0
    except libvirt.libvirtError:
        return False


def module_pids(proc: subprocess.Popen, module: str) -> list[int]:
    """The processes running ``module`` (AnsiballZ_<module>.py) below an `ansible` run: the
    module's Python itself, not the `/bin/sh -c` wrappers whose command line names it too."""
    pids = []
    for pid in descendants(proc.pid):
        try:
            argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and b"python" in os.path.basename(argv[0]) and argv[1].endswith(f"AnsiballZ_{module}.py".encode()):
            pids.append(pid)
    return pids


# ----------------------------------------------------------------------------- results and directories
def expect_ok(result: dict) -> dict:
    """A run that changed something; the whole result in the message when not."""
    assert result["changed"] and not result["failed"], json.dumps(result, indent=1)[:4000]
    return result


def expect_error(result: dict, code: str) -> dict:
    """A refusal with ``code``, as a module result (never a traceback)."""
    assert result["failed"] and result.get("error_code") == code, json.dumps(result, indent=1)[:4000]
    assert "Traceback" not in result.get("msg", "") and "module_stderr" not in result, result
    return result


def make_dir(path: pathlib.Path, mode: int = 0o711) -> pathlib.Path:
    """A root-owned directory QEMU (libvirt-qemu) can traverse."""
    path.mkdir(mode=mode)
    os.chmod(path, mode)
    return path


def listing(path: pathlib.Path) -> list[str]:
    """Every name in a directory, hidden ones included ([] when it does not exist)."""
    return sorted(os.listdir(path)) if path.exists() else []


# ----------------------------------------------------------------------------- independent checks
def chain_json(files: list[pathlib.Path | str]) -> str:
    """json: spec reading files (base first) as one backing chain, written independently of the collection."""
    node = None
    for f in files:
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": str(f)}, "backing": node}
    return "json:" + json.dumps(node)


def parse_disk_sources(xml: str) -> dict[str, str]:
    """target -> source file of a domain's file-backed disks, read straight from its XML."""
    root = ET.fromstring(xml)
    out = {}
    for disk in root.findall("./devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        if source is not None and target is not None and source.get("file"):
            out[target.get("dev")] = source.get("file")
    return out


def images_equal(a: str, b: str, force_share: bool = True) -> tuple[bool, str]:
    argv = ["qemu-img", "compare"] + (["-U"] if force_share else []) + [a, b]
    proc = run(argv, check=False)
    return proc.returncode == 0, proc.stdout + proc.stderr


def allocated_data_bytes(image: str) -> int:
    """Bytes of the image that hold data (qemu-img map), independent of the file size."""
    data = json.loads(run(["qemu-img", "map", "-U", "--output=json", image]).stdout)
    return sum(e["length"] for e in data if e.get("data"))


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_state(root: pathlib.Path) -> dict[str, tuple]:
    """Every path under root with type, mode, size and content hash: 'byte-identical' made checkable."""
    state: dict[str, tuple] = {}
    if not os.path.lexists(root):
        return state
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = pathlib.Path(dirpath) / name
            st = p.lstat()
            digest = sha256(p) if p.is_file() and not p.is_symlink() else None
            state[str(p.relative_to(root))] = (st.st_mode, st.st_size if digest else None, digest)
    st = root.lstat()
    state["."] = (st.st_mode, None, None)
    return state


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ansible and every process below it: Ansible's worker calls setsid(), so a
    process-group kill would miss the module."""
    # Freeze the whole tree first, then kill it: a process that outlives its parent for a
    # moment may be sent a catchable signal (Ansible's worker dying) and would then roll back
    # like a cancelled run, which is not the hard kill this simulates.
    frozen: set[int] = set()
    while True:
        pids = [p for p in [proc.pid] + descendants(proc.pid) if p not in frozen]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            frozen.add(pid)
    pids = sorted(frozen - {proc.pid})
    for pid in [proc.pid] + pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and "Z" not in _state(p) for p in pids), 30, what="killed processes to exit")


def _state(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def wait_for(predicate: t.Callable[[], t.Any], timeout: float, interval: float = 0.02, what: str = "condition") -> t.Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def result_and_warnings(runner: AnsibleRunner, module: str, args: dict[str, t.Any], check: bool = False,
                        timeout: float = 600) -> tuple[dict[str, t.Any], str]:
    """A module run's result and the text of its warnings: the minimal callback takes the
    ``warnings`` out of the result and prints them as ``[WARNING]:`` lines (wrapped), so
    ``result.get("warnings")`` is always empty through the CLI."""
    proc = subprocess.run(runner.argv(module, args, check), env=runner.env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    text = " ".join((proc.stdout + "\n" + proc.stderr).split())
    warnings = " ".join(part.split(" localhost | ")[0] for part in text.split("[WARNING]:")[1:])
    return parse_result(proc.stdout, proc.stderr), warnings


# ----------------------------------------------------------------------------- playbooks
@dataclasses.dataclass
class PlaybookRun:
    """An ansible-playbook run (default callback): its exit code, stdout and stderr."""

    rc: int
    stdout: str
    stderr: str

    @property
    def text(self) -> str:
        return f"rc={self.rc}\n{self.stdout[-12000:]}\n{self.stderr[-4000:]}"

    def stats(self) -> dict[str, t.Any]:
        """The set_stats data of the run (what AWX keeps as the job's artifacts); {} when none."""
        match = re.search(r"^\s*RUN: (\{.*\})\s*$", self.stdout, re.M)
        return json.loads(match.group(1)) if match else {}

    def recap(self, host: str) -> dict[str, int]:
        match = re.search(rf"^{re.escape(host)}\s+:\s+(.*)$", self.stdout, re.M)
        assert match, self.text
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def run_playbook(env: dict[str, str], playbook: str, extra_vars: dict[str, t.Any], check: bool = False,
                 inventory: str = "localhost,", connection: str | None = "local", timeout: float = 900) -> PlaybookRun:
    """ansible-playbook with ``extra_vars`` passed the way AWX passes a survey's answers (-e @file),
    set_stats shown (the default callback; ansible-core 2.19 ships no json callback)."""
    import tempfile  # pylint: disable=import-outside-toplevel
    env = dict(env, ANSIBLE_STDOUT_CALLBACK="default", ANSIBLE_SHOW_CUSTOM_STATS="1")
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="vmbt-vars-") as fh:
        json.dump(extra_vars, fh)
        fh.flush()
        argv = [str(pathlib.Path(sys.executable).parent / "ansible-playbook"), "-i", inventory, playbook, "-e", f"@{fh.name}"]
        if connection:
            argv += ["-c", connection]
        if check:
            argv.append("--check")
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    return PlaybookRun(proc.returncode, proc.stdout, proc.stderr)
