"""The multi-host test bed from a test's side (scripts/testbed.sh; docs/testing.md, "The multi-host
test bed"): hypervisor hosts hv1..hvN on this machine, each its own libvirtd reached over SSH by
Ansible, sharing the repository directory /srv/vmbackup.

A test reaches a bed host's libvirtd directly (``connect``: the independent check path), its files
(``path``), its processes (``run``); it runs playbooks against the bed's inventory (``playbook``)
and makes tiny guests on a host (``guests``). Faults: ``stop_libvirtd``/``start_libvirtd``,
``block_ssh``/``unblock_ssh``. Tests leave the bed as they found it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import typing as t

import libvirt

from guest import GuestFactory
from harness import destroy_vm

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "testbed.sh"
CALLBACKS = pathlib.Path(__file__).resolve().parent / "callback_plugins"
DEFAULT_DIR = pathlib.Path("/var/lib/vmbackup-testbed")
DEFAULT_NET = "10.231"
REPO = pathlib.PurePosixPath("/srv/vmbackup")  # the shared repository as the bed hosts see it
SLOTS = 8  # concurrent beds on one machine (test sessions of different checkouts)


class TestbedError(AssertionError):
    """The bed did not do what a test asked (its script's output attached)."""


@dataclasses.dataclass
class PlaybookResult:
    rc: int
    json: dict[str, t.Any]  # plays/tasks/per-host results, stats, custom_stats (callback_plugins/bed_json.py)
    stdout: str
    stderr: str

    @property
    def stats(self) -> dict[str, dict[str, int]]:
        return self.json.get("stats", {})

    @property
    def custom_stats(self) -> dict[str, t.Any]:
        return self.json.get("custom_stats", {})

    def results(self, task: str | None = None, host: str | None = None) -> list[tuple[str, str, dict[str, t.Any]]]:
        """(task name, host, result) of every task run, optionally of one task name / host."""
        out = []
        for play in self.json.get("plays", []):
            for entry in play["tasks"]:
                for name, res in entry["hosts"].items():
                    if (task is None or entry["task"]["name"] == task) and (host is None or name == host):
                        out.append((entry["task"]["name"], name, res))
        return out


class Testbed:
    """A running bed (``Testbed.up`` brings one up, or attaches to the one running there)."""

    __test__ = False  # not a test class

    def __init__(self, state: pathlib.Path = DEFAULT_DIR, net: str = DEFAULT_NET, env: dict[str, str] | None = None) -> None:
        self.state = pathlib.Path(state)
        self.net = net
        self.ansible_env = dict(env) if env is not None else None  # the installed collection's environment
        self.brought_up = False
        self._conns: list[t.Any] = []
        self._lock: t.IO | None = None
        self._runs = 0
        self.hosts_info: dict[str, dict[str, t.Any]] = {}
        if (self.state / "hosts.json").exists():
            self._load()

    # ------------------------------------------------------------------ life cycle
    @classmethod
    def session(cls, env: dict[str, str] | None = None, hosts: int = 3) -> "Testbed":
        """The bed of this test session: VMBACKUP_TESTBED_DIR (+ VMBACKUP_TESTBED_NET) when set,
        else the first free slot (/var/lib/vmbackup-testbed, -2, -3 ... with 10.231, 10.232 ...),
        locked for the session so that concurrent sessions (other checkouts) get beds of their own.
        A bed already running there is checked and used (and left running at the end)."""
        if os.environ.get("VMBACKUP_TESTBED_DIR"):
            bed = cls(pathlib.Path(os.environ["VMBACKUP_TESTBED_DIR"]), os.environ.get("VMBACKUP_TESTBED_NET", DEFAULT_NET), env)
            bed._lock = _try_lock(bed.state.with_name(bed.state.name + ".lock"), wait=True)
        else:
            for slot in range(SLOTS):
                state = DEFAULT_DIR if slot == 0 else DEFAULT_DIR.with_name(f"{DEFAULT_DIR.name}-{slot + 1}")
                lock = _try_lock(state.with_name(state.name + ".lock"), wait=False)
                if lock is not None:
                    bed = cls(state, f"10.{231 + slot}", env)
                    bed._lock = lock
                    break
            else:
                raise TestbedError(f"all {SLOTS} test bed slots are in use")
        existed = (bed.state / "hosts.json").exists()
        owner = bed._owner()
        # brought up here: when it is not running; also a bed left by a session that died (its
        # owner pid gone), which this session takes down at the end as its owner would have. A bed
        # brought up by hand (`testbed.sh up`: no owner) stays up.
        bed.brought_up = not bed._healthy(hosts) and not existed or (owner is not None and not _alive(owner))
        try:
            bed.up(hosts)
        except TestbedError:
            if bed.brought_up:  # nothing half-built left behind by this session
                bed.script("down", check=False)
            bed.release()
            raise
        if bed.brought_up:
            (bed.state / "owner").write_text(f"{os.getpid()}\n")
        if existed:
            bed.reset()
        return bed

    def _owner(self) -> int | None:
        try:
            return int((self.state / "owner").read_text())
        except (OSError, ValueError):
            return None

    def reset(self) -> None:
        """What a killed test session may have left on a running bed: every domain of every bed host
        (destroyed, undefined), every file in their /var/lib/libvirt/images, the shared repository's
        content; libvirtd started and SSH unblocked. The bed belongs to the tests."""
        status = self.status()
        for host, st in status.items():
            if host not in self.hosts_info:
                continue
            if st.get("ssh_blocked"):
                self.unblock_ssh(host)
            if not st.get("libvirtd"):
                self.start_libvirtd(host)
            hconn = self.connect(host)
            for dom in hconn.listAllDomains():
                destroy_vm(dom)
            images = self.path(host, "/var/lib/libvirt/images")
            for child in images.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        self.close()
        self.fresh_repo()

    def _healthy(self, hosts: int) -> bool:
        try:
            status = self.status()
        except TestbedError:
            return False
        return all(status.get(f"hv{i}", {}).get("libvirtd") and status[f"hv{i}"].get("sshd") for i in range(1, hosts + 1))

    def script(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        env = dict(os.environ, VMBACKUP_TESTBED_DIR=str(self.state), VMBACKUP_TESTBED_NET=self.net, VENV=sys.prefix)
        proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise TestbedError(f"testbed.sh {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def up(self, hosts: int = 3) -> None:
        self.script("up", "--hosts", str(hosts))
        self._load()

    def down(self) -> None:
        self.close()
        self.script("down")
        self.hosts_info = {}

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        self._conns.clear()

    def release(self) -> None:
        """End of the session: down when this session brought the bed up (VMBACKUP_TESTBED_KEEP=1
        keeps it), then the slot's lock goes."""
        self.close()
        if self.brought_up and os.environ.get("VMBACKUP_TESTBED_KEEP") != "1":
            self.down()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _load(self) -> None:
        self.hosts_info = json.loads((self.state / "hosts.json").read_text())

    def status(self) -> dict[str, dict[str, t.Any]]:
        proc = self.script("status", check=False)
        if proc.returncode != 0:
            raise TestbedError(proc.stderr)
        return json.loads(proc.stdout)

    # ------------------------------------------------------------------ what tests use
    @property
    def hosts(self) -> list[str]:
        return sorted(self.hosts_info, key=lambda h: int(h[2:]))

    @property
    def inventory(self) -> pathlib.Path:
        return self.state / "inventory.ini"

    @property
    def repo(self) -> str:
        """The shared repository as the bed hosts see it (module/role arguments)."""
        return str(REPO)

    @property
    def repo_local(self) -> pathlib.Path:
        """The same directory as this test process sees it (independent checks)."""
        return self.state / "shared"

    def address(self, host: str) -> str:
        return self.hosts_info[host]["address"]

    def uri(self, host: str) -> str:
        return self.hosts_info[host]["uri"]

    def connect(self, host: str):
        """A new libvirt connection to the host's libvirtd (closed by close()/release())."""
        conn = libvirt.open(self.uri(host))
        self._conns.append(conn)
        return conn

    def path(self, host: str, path: str | os.PathLike) -> pathlib.Path:
        """The host's ``path`` as this test process sees it (through /proc/<init>/root)."""
        return pathlib.Path(self.hosts_info[host]["root"]) / str(path).lstrip("/")

    def run(self, host: str, argv: list[str], check: bool = True, input: str | None = None,  # pylint: disable=redefined-builtin
            timeout: float = 120) -> subprocess.CompletedProcess:
        """argv in all of the host's namespaces (hostname, mounts, network, processes)."""
        env = dict(os.environ, VMBACKUP_TESTBED_DIR=str(self.state), VMBACKUP_TESTBED_NET=self.net, VENV=sys.prefix)
        proc = subprocess.run(["bash", str(SCRIPT), "exec", host, *argv], env=env, input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise TestbedError(f"{host}: {argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def stop_libvirtd(self, host: str) -> None:
        self.script("libvirtd", host, "stop")

    def start_libvirtd(self, host: str) -> None:
        self.script("libvirtd", host, "start")

    def block_ssh(self, host: str) -> None:
        self.script("ssh", host, "block")

    def unblock_ssh(self, host: str) -> None:
        self.script("ssh", host, "unblock")

    @contextlib.contextmanager
    def libvirtd_stopped(self, host: str) -> t.Iterator[None]:
        self.stop_libvirtd(host)
        try:
            yield
        finally:
            self.start_libvirtd(host)

    @contextlib.contextmanager
    def ssh_blocked(self, host: str) -> t.Iterator[None]:
        self.block_ssh(host)
        try:
            yield
        finally:
            self.unblock_ssh(host)

    def fresh_repo(self) -> pathlib.Path:
        """Empty the shared repository directory (root-owned, 0711 kept); returns repo_local."""
        shared = self.repo_local
        for child in shared.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        os.chown(shared, 0, 0)
        os.chmod(shared, 0o711)
        return shared

    def guests(self, host: str, **kw) -> GuestFactory:
        """Tiny guests on ``host``, images in its /var/lib/libvirt/images; cleanup() removes them."""
        return GuestFactory(self.connect(host), images=pathlib.Path("/var/lib/libvirt/images"),
                            root=pathlib.Path(self.hosts_info[host]["root"]), **kw)

    def playbook(self, name_or_path: str | os.PathLike, extra_vars: dict[str, t.Any] | None = None, check: bool = False,
                 limit: str | None = None, timeout: float = 900, args: list[str] | None = None) -> PlaybookResult:
        """ansible-playbook (a name under playbooks/, or a path) against the bed's inventory; the
        results parsed from a JSON callback; stdout is the default callback's."""
        if self.ansible_env is None:
            raise TestbedError("playbook() needs the installed collection's environment (the `testbed` fixture has it)")
        path = pathlib.Path(name_or_path)
        if not path.is_absolute() and not path.exists():
            path = ROOT / "playbooks" / (str(name_or_path) if str(name_or_path).endswith((".yml", ".yaml")) else f"{name_or_path}.yml")
        self._runs += 1
        workdir = self.state / "runs"
        workdir.mkdir(mode=0o700, exist_ok=True)
        out = workdir / f"result-{os.getpid()}-{self._runs}.json"
        argv = [str(pathlib.Path(sys.executable).parent / "ansible-playbook"), "-i", str(self.inventory), str(path)]
        if extra_vars:
            vars_file = workdir / f"vars-{os.getpid()}-{self._runs}.json"
            vars_file.write_text(json.dumps(extra_vars))
            argv += ["-e", f"@{vars_file}"]
        if check:
            argv.append("--check")
        if limit:
            argv += ["--limit", limit]
        argv += args or []
        env = dict(self.ansible_env, ANSIBLE_STDOUT_CALLBACK="default", ANSIBLE_CALLBACK_PLUGINS=str(CALLBACKS),
                   ANSIBLE_CALLBACKS_ENABLED="bed_json", ANSIBLE_SHOW_CUSTOM_STATS="1", VMBACKUP_BED_JSON=str(out))
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        try:
            data = json.loads(out.read_text())
        except (OSError, ValueError):
            data = {}
        finally:
            out.unlink(missing_ok=True)
        return PlaybookResult(proc.returncode, data, proc.stdout, proc.stderr)

    def ansible(self, pattern: str, module: str, args: dict[str, t.Any] | str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """An ad-hoc `ansible PATTERN -m MODULE` against the bed's inventory (raw output)."""
        if self.ansible_env is None:
            raise TestbedError("ansible() needs the installed collection's environment")
        argv = [str(pathlib.Path(sys.executable).parent / "ansible"), "-i", str(self.inventory), pattern, "-m", module]
        if args is not None:
            argv += ["-a", args if isinstance(args, str) else json.dumps(args)]
        return subprocess.run(argv, env=self.ansible_env, capture_output=True, text=True, timeout=timeout, check=False)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_lock(path: pathlib.Path, wait: bool) -> t.IO | None:
    handle = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def wait_for(predicate: t.Callable[[], t.Any], timeout: float, what: str, interval: float = 0.1) -> t.Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TestbedError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
