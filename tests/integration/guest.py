"""The tiny real test guest: a Linux kernel booting an initramfs with busybox and the QEMU guest
agent, and an ext4 data disk (vda, mounted at /data in the guest). Built from Debian packages by
scripts/build-test-guest.sh (cached); see docs/testing.md.

Tests talk to the guest through the agent (libvirt_qemu.qemuAgentCommand): guest-exec runs
commands, so files written and read here went through the guest's own kernel and filesystem.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import time
import typing as t
import uuid
import xml.etree.ElementTree as ET
from xml.sax import saxutils

import libvirt
import libvirt_qemu

from harness import IMAGES, PREFIX, destroy_vm, pick_domain_type, run

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-test-guest.sh"
# Where the build script caches the guest: VMBACKUP_GUEST_DIR, else a directory per version of
# the script under the script's default, so that test runs from checkouts with different versions
# (worktrees, branches) do not rebuild each other's files under their feet.
GUEST_BASE = pathlib.Path("/var/cache/vmbackup-test-guest")
AGENT_CHANNEL = "org.qemu.guest_agent.0"
CONTROL_CHANNEL = "org.vmbackup.control.0"  # our own port into /init: works without the agent
CMDLINE = "console=ttyS0 quiet panic=-1"


class GuestError(AssertionError):
    """The guest did not do what a test asked (boot, agent, command); the message carries the
    tail of its serial console."""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    kernel: pathlib.Path          # what the guest boots: vmlinux (PVH entry) when built, else vmlinuz
    initrd: pathlib.Path
    data_template: pathlib.Path
    vmlinuz: pathlib.Path         # the packaged kernel as it is (bzImage)
    build_seconds: float          # the build script's wall time in this process (~0.03 s when cached)


_IMAGE: GuestImage | None = None


def guest_dir() -> pathlib.Path:
    if os.environ.get("VMBACKUP_GUEST_DIR"):
        return pathlib.Path(os.environ["VMBACKUP_GUEST_DIR"])
    version = hashlib.sha256(BUILD_SCRIPT.read_bytes()).hexdigest()[:12]
    # QEMU (libvirt-qemu) must traverse it whatever the umask of whoever created it first
    GUEST_BASE.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(GUEST_BASE, 0o755)
    _prune_versions(keep=version)
    return GUEST_BASE / f"v-{version}"


def _prune_versions(keep: str, days: float = 2) -> None:
    """Remove the builds of other script versions not used for ``days`` (every build run, also
    one that finds its files current, opens the directory's .lock for writing: its mtime)."""
    if not GUEST_BASE.is_dir():
        return
    for path in GUEST_BASE.glob("v-*"):
        try:
            idle = time.time() - (path / ".lock").stat().st_mtime
        except OSError:
            continue
        if path.name != f"v-{keep}" and idle > days * 86400:
            shutil.rmtree(path, ignore_errors=True)


def guest_image() -> GuestImage:
    """Run the build script once per process (it is a no-op when its stamp matches)."""
    global _IMAGE  # pylint: disable=global-statement
    if _IMAGE is None:
        start = time.monotonic()
        proc = subprocess.run(["bash", str(BUILD_SCRIPT), str(guest_dir())], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise GuestError(f"{BUILD_SCRIPT} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        outdir = pathlib.Path(proc.stdout.strip().splitlines()[-1])
        # PVH boot of the uncompressed kernel skips the bzImage's decompression (~3 s under TCG);
        # VMBACKUP_GUEST_PVH=0 boots the packaged bzImage instead.
        kernel = outdir / "vmlinux"
        if os.environ.get("VMBACKUP_GUEST_PVH") == "0" or not kernel.exists():
            kernel = outdir / "vmlinuz"
        _IMAGE = GuestImage(kernel, outdir / "initrd.gz", outdir / "data.qcow2", outdir / "vmlinuz", time.monotonic() - start)
    return _IMAGE


KVM_HANG_SECONDS = 20
_KVM_HANGS: list[str] = []  # guests whose KVM boot hung in this process: later ones use TCG at once


def guest_domain_type(conn) -> str:
    """TCG unless VMBACKUP_GUEST_KVM=1 (a booting guest hung under nested KVM on the test bed);
    with it, kvm when a probe domain starts (and no KVM boot hung yet in this process), else TCG.
    A KVM guest whose /init does not speak within KVM_HANG_SECONDS is booted again under TCG."""
    if os.environ.get("VMBACKUP_GUEST_KVM") == "1" and not _KVM_HANGS:
        return pick_domain_type(conn)
    return "qemu"


def agent_command(dom, command: str, arguments: dict | None = None, timeout: int = 10) -> t.Any:
    """One guest agent command through libvirt; its "return" value."""
    msg: dict[str, t.Any] = {"execute": command}
    if arguments is not None:
        msg["arguments"] = arguments
    out = libvirt_qemu.qemuAgentCommand(dom, json.dumps(msg), max(1, int(timeout)), 0)
    return json.loads(out).get("return") if out else None


@dataclasses.dataclass
class Guest:
    conn: t.Any
    dom: t.Any
    name: str
    workdir: pathlib.Path
    paths: dict[str, pathlib.Path]  # target -> image path (vda = the data disk), as this process sees it
    agent: bool = True             # whether it was booted with the agent running
    root: pathlib.Path | None = None  # how this process sees the libvirtd host's "/" (a bed host's /proc/<pid>/root)

    def local(self, path: str | os.PathLike) -> pathlib.Path:
        """A path of the libvirtd host (e.g. from the domain XML) as this process sees it."""
        return self.root / str(path).lstrip("/") if self.root is not None else pathlib.Path(path)

    def host_path(self, path: str | os.PathLike) -> pathlib.Path:
        """The inverse of local(): a path this process sees as the libvirtd host sees it."""
        if self.root is None:
            return pathlib.Path(path)
        return pathlib.Path("/") / pathlib.Path(path).relative_to(self.root)

    @property
    def host_paths(self) -> dict[str, pathlib.Path]:
        """target -> image path as the domain XML names it."""
        return {target: self.host_path(path) for target, path in self.paths.items()}

    @property
    def uuid(self) -> str:
        return self.dom.UUIDString()

    @property
    def console_log(self) -> pathlib.Path:
        """The serial console's file, from the domain's XML (workdir/console.log for ours)."""
        try:
            serials = ET.fromstring(self.dom.XMLDesc(0)).findall("./devices/serial")
        except libvirt.libvirtError:
            serials = []
        for serial in serials:
            source = serial.find("source")
            if serial.get("type") == "file" and source is not None and source.get("path"):
                return self.local(source.get("path"))
        return self.workdir / "console.log"

    def console(self, tail: int = 40) -> str:
        """The last lines of the serial console (kernel messages, /init markers)."""
        try:
            lines = self.console_log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no console log)"
        return "\n".join(lines[-tail:])

    def _fail(self, msg: str) -> t.NoReturn:
        raise GuestError(f"{self.name}: {msg}\n--- serial console (tail) ---\n{self.console()}")

    # ------------------------------------------------------------------ agent
    def agent_command(self, command: str, arguments: dict | None = None, timeout: int = 10) -> t.Any:
        return agent_command(self.dom, command, arguments, timeout)

    def ping(self, timeout: int = 5) -> bool:
        try:
            self.agent_command("guest-ping", timeout=timeout)
            return True
        except libvirt.libvirtError:
            return False

    def wait_agent(self, timeout: float = 60) -> None:
        """Until guest-ping answers (boot done, agent up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.dom.isActive():
                self._fail("domain stopped while waiting for the guest agent")
            if self.ping(timeout=2):
                return
            time.sleep(0.1)
        self._fail(f"guest agent did not answer within {timeout}s")

    def wait_console(self, marker: str, timeout: float = 60) -> None:
        """Until the serial console shows ``marker`` (e.g. "vmbackup-guest: ready")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if marker in self.console_log.read_text(errors="replace"):
                    return
            except OSError:
                pass
            if not self.dom.isActive():
                self._fail(f"domain stopped before the console showed {marker!r}")
            time.sleep(0.1)
        self._fail(f"console did not show {marker!r} within {timeout}s")

    def spawn(self, argv: list[str], input: bytes | None = None, capture: bool = True) -> int:  # pylint: disable=redefined-builtin
        """Start argv in the guest (guest-exec, PATH searched) and return its guest pid at once;
        wait() collects it. For work that runs on while the test does something else."""
        args: dict[str, t.Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": capture}
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode()
            # A guest-exec message of 256 KiB or more left the agent channel dead for the rest of
            # the guest's life (qemu-ga 7.2, libvirt 9.0); write_file sends 128 KiB pieces.
            if len(args["input-data"]) > 200 * 1024:
                raise ValueError(f"input of {len(input)} bytes is too large for one guest-exec (max ~150 KiB): use write_file")
        try:
            return int(self.agent_command("guest-exec", args, timeout=30)["pid"])
        except libvirt.libvirtError as exc:
            self._fail(f"guest-exec {argv!r} failed: {exc}")

    def wait(self, pid: int, timeout: float = 30, what: str = "") -> tuple[int, bytes, bytes]:
        """(exit code, stdout, stderr) of a spawned process, polling guest-exec-status. A process
        killed by signal N gives 128+N. Past the timeout it is killed (-9) and GuestError raised."""
        deadline = time.monotonic() + timeout
        interval = 0.01
        while True:
            try:
                status = self.agent_command("guest-exec-status", {"pid": pid}, timeout=10)
            except libvirt.libvirtError as exc:
                self._fail(f"guest-exec-status for {what or pid} failed: {exc}")
            if status.get("exited"):
                break
            if time.monotonic() > deadline:
                try:
                    self.agent_command("guest-exec", {"path": "kill", "arg": ["-9", str(pid)]})
                except libvirt.libvirtError:
                    pass
                self._fail(f"command {what or pid} did not finish within {timeout}s")
            time.sleep(interval)
            interval = min(interval * 2, 0.2)
        out = base64.b64decode(status.get("out-data", ""))
        err = base64.b64decode(status.get("err-data", ""))
        code = status["exitcode"] if "exitcode" in status else 128 + int(status.get("signal", 0))
        return code, out, err

    def exec(self, argv: list[str], input: bytes | None = None, timeout: float = 30) -> tuple[int, bytes, bytes]:  # pylint: disable=redefined-builtin
        """Run argv in the guest and wait for it: (exit code, stdout, stderr). Output beyond the
        agent's limit (16 MiB) is cut. GuestError (with the console tail) on timeout or when the
        agent fails."""
        return self.wait(self.spawn(argv, input=input), timeout=timeout, what=repr(argv))

    def sh(self, script: str, *args: str, input: bytes | None = None, timeout: float = 30, check: bool = True) -> bytes:  # pylint: disable=redefined-builtin
        """Run a shell script in the guest ($1.. = args); its stdout. check: nonzero exit raises."""
        code, out, err = self.exec(["sh", "-c", script, "sh", *args], input=input, timeout=timeout)
        if check and code != 0:
            self._fail(f"sh -c {script!r} {list(args)!r} exited {code}: {err.decode(errors='replace')}")
        return out

    def write_file(self, path: str, data: bytes, sync: bool = True) -> None:
        """Write data to path in the guest (through the guest's filesystem); fsync'ed with sync."""
        chunk = 128 * 1024  # see spawn: one guest-exec message must stay well below 256 KiB
        for i in range(0, max(len(data), 1), chunk):
            self.sh('cat > "$1"' if i == 0 else 'cat >> "$1"', path, input=data[i:i + chunk])
        if sync:
            self.sh('sync "$1"', path)

    def read_file(self, path: str) -> bytes:
        """The content of path in the guest; FileNotFoundError when it does not exist. Read in
        1 MiB pieces: libvirt refuses an agent reply above 4 MiB ("Unable to encode message
        payload"), and output is base64 in it."""
        piece, blocks = 1024 * 1024, 16  # 16 blocks of 64 KiB
        data = b""
        while True:
            code, out, err = self.exec(["sh", "-c", 'test -e "$1" || exit 44; exec dd if="$1" bs=65536 skip="$2" count="$3" 2>/dev/null',
                                        "sh", path, str(len(data) // 65536), str(blocks)])
            if code == 44:
                raise FileNotFoundError(path)
            if code != 0:
                self._fail(f"reading {path} exited {code}: {err.decode(errors='replace')}")
            data += out
            if len(out) < piece:
                return data

    def sync(self) -> None:
        self.sh("sync")

    def fsfreeze_status(self) -> str:
        """"thawed" | "frozen", as the agent reports it (guest-fsfreeze-status)."""
        return self.agent_command("guest-fsfreeze-status")

    def set_slow_freeze(self, seconds: int) -> None:
        """The freeze hook sleeps this long before each freeze (0: no delay). Kept in /run
        (tmpfs), so it does not touch the data disk."""
        if seconds > 0:
            self.sh('echo "$1" > /run/slow-freeze', str(int(seconds)))
        else:
            self.sh("rm -f /run/slow-freeze")

    def freeze_hook_log(self) -> list[str]:
        """The freeze hook's calls, "<epoch> freeze|thaw" per line."""
        return self.sh("cat /run/fsfreeze-hook.log 2>/dev/null || true").decode().split("\n")[:-1]

    # ------------------------------------------------------------------ control port (no agent needed)
    def control(self, command: str, timeout: float = 10) -> str:
        """One command to /init over the control port (virtio-serial org.vmbackup.control.0, whose
        unix socket libvirt puts under /var/lib/libvirt/qemu/channel/target/); its reply line.
        Commands: ping, agent-on, agent-off, agent-kill, thaw."""
        root = ET.fromstring(self.dom.XMLDesc(0))
        path = None
        for channel in root.findall("./devices/channel"):
            target, source = channel.find("target"), channel.find("source")
            if target is not None and target.get("name") == CONTROL_CHANNEL and source is not None:
                path = source.get("path")
        if not path:
            self._fail("no control channel socket (is the domain running?)")
        buf = b""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(str(self.local(path)))
                sock.sendall(command.encode() + b"\n")
                while not buf.endswith(b"\n"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as exc:
            self._fail(f"control command {command!r}: {exc} (got {buf!r})")
        reply = buf.decode(errors="replace").strip()
        if not reply.startswith("ok"):
            self._fail(f"control command {command!r} answered {reply!r}")
        return reply

    def wait_control(self, timeout: float = 60) -> None:
        """Until /init answers on the control port (booted; the agent may be off)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.dom.isActive():
                self._fail("domain stopped while waiting for the control port")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"control port did not answer within {timeout}s")
            try:
                self.control("ping", timeout=min(2, remaining))
                return
            except GuestError:
                time.sleep(0.1)

    def stop_agent(self, timeout: float = 30) -> None:
        """Stop qemu-ga and keep it stopped (/run/ga-off, through the control port); returns when
        it no longer answers. A freeze in force stays in force (the kernel keeps /data frozen)."""
        self.control("agent-off")
        deadline = time.monotonic() + timeout
        while self.ping(timeout=2):
            if time.monotonic() > deadline:
                self._fail(f"guest agent still answers {timeout}s after being stopped")
            time.sleep(0.1)

    def start_agent(self, timeout: float = 60) -> None:
        """Start qemu-ga again (or the first time, in a guest booted with agent=False); returns
        when it answers."""
        self.control("agent-on")
        self.wait_agent(timeout)

    def kill_agent(self) -> None:
        """SIGKILL qemu-ga, as a crash would; its supervisor in /init starts it again ~0.2 s later
        (wait_agent to wait for that)."""
        self.control("agent-kill")

    def thaw_without_agent(self) -> bool:
        """Thaw /data in the guest kernel directly (busybox fsfreeze --unfreeze), bypassing the
        agent; True when it was frozen. qemu-ga's own idea of the state is not changed."""
        return self.control("thaw").split()[-1] == "0"

    # ------------------------------------------------------------------ life cycle
    def start(self, wait: bool = True, timeout: float = 60) -> None:
        self.console_log.unlink(missing_ok=True)
        self.dom.create()
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        """Booted: the agent answers (booted without it: /init answers on the control port)."""
        if self.agent:
            self.wait_agent(timeout)
        else:
            self.wait_control(timeout)

    def shutdown(self, timeout: float = 60, mode: str | None = None) -> None:
        """A clean power-off; the guest unmounts /data and powers off. mode None: libvirt asks
        the agent (guest-shutdown) when it is connected, else presses the ACPI power button;
        "agent" / "acpi": only that way."""
        if not self.dom.isActive():
            return
        flags = {None: 0, "agent": libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT,
                 "acpi": libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN}[mode]
        try:
            self.dom.shutdownFlags(flags)
        except libvirt.libvirtError as exc:
            self._fail(f"shutdown refused: {exc}")
        deadline = time.monotonic() + timeout
        while self.dom.isActive():
            if time.monotonic() > deadline:
                self._fail(f"still running {timeout}s after shutdown")
            time.sleep(0.1)

    def destroy(self) -> None:
        if self.dom.isActive():
            self.dom.destroy()

    def xml(self) -> str:
        return self.dom.XMLDesc(0)


def domain_xml(name: str, image: GuestImage, disks: dict[str, pathlib.Path], console: pathlib.Path, agent: bool = True,
               domain_type: str = "qemu", memory_mib: int = 128) -> str:
    """The test guest's domain XML: direct kernel boot, qcow2 virtio disks (target -> file, alias
    ua-<target>), serial console to a file, the agent and control channels, nothing else."""
    disk_xml = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{saxutils.escape(str(path))}'/>"
        f"<target dev='{target}' bus='virtio'/><alias name='ua-{target}'/></disk>"
        for target, path in disks.items()
    )
    cmdline = CMDLINE + ("" if agent else " vmbackup.agent=0")
    return (
        f"<domain type='{domain_type}'><name>{saxutils.escape(name)}</name>"
        f"<memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type>"
        f"<kernel>{image.kernel}</kernel><initrd>{image.initrd}</initrd><cmdline>{cmdline}</cmdline></os>"
        "<features><acpi/></features><clock offset='utc'/>"
        "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>"
        f"<devices>{disk_xml}"
        f"<serial type='file'><source path='{saxutils.escape(str(console))}'/><target port='0'/></serial>"
        f"<channel type='unix'><target type='virtio' name='{AGENT_CHANNEL}'/></channel>"
        f"<channel type='unix'><target type='virtio' name='{CONTROL_CHANNEL}'/></channel>"
        "<controller type='usb' model='none'/><memballoon model='none'/>"
        "</devices></domain>"
    )


class GuestFactory:
    """Throwaway guests; cleanup() destroys and undefines them and removes their files."""

    def __init__(self, conn, domain_type: str | None = None, memory_mib: int = 128, images: pathlib.Path | None = None,
                 root: pathlib.Path | None = None) -> None:
        """``images``: the directory, as the libvirtd host sees it, the guests' directories go in
        (default /var/lib/libvirt/images); ``root``: how this process sees that host's "/" when
        it is not this one's (a test bed host: tests/integration/testbed.py)."""
        self.conn = conn
        self.domain_type = domain_type or guest_domain_type(conn)
        self.memory_mib = memory_mib
        self.images = pathlib.Path(images) if images is not None else IMAGES
        self.root = pathlib.Path(root) if root is not None else None
        self.guests: list[Guest] = []
        self.adopted: list[Guest] = []

    def create(self, name: str | None = None, agent: bool = True, running: bool = True, extra_disks: int = 0,
               data_size: str | None = None, wait: bool = True, boot_timeout: float = 90) -> Guest:
        """A guest with its own copy of the data disk as vda (ext4 "data", mounted at /data, alias
        ua-vda) and ``extra_disks`` blank 64 MiB qcow2 disks vdb.. (alias ua-vdb..). agent=False
        boots with the agent off (kernel cmdline vmbackup.agent=0). running + wait: returns once
        the agent answers (agent=False: once /init answers on the control port)."""
        image = guest_image()
        token = uuid.uuid4().hex[:10]
        host_workdir = self.images / f"{PREFIX}g-{token}"
        workdir = self._local(host_workdir)
        workdir.mkdir(mode=0o755)
        os.chmod(workdir, 0o755)
        name = name if name is not None else f"{PREFIX}g-{token}"
        paths: dict[str, pathlib.Path] = {"vda": workdir / "vda.qcow2"}
        if data_size is None:
            shutil.copyfile(image.data_template, paths["vda"])
        else:
            raw = workdir / "vda.raw"
            run(["truncate", "-s", data_size, str(raw)])
            run(["mkfs.ext4", "-q", "-F", "-L", "data", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(raw)])
            run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(paths["vda"])])
            raw.unlink()
        for i in range(extra_disks):
            target = "vd" + "bcdefgh"[i]
            paths[target] = workdir / f"{target}.qcow2"
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(paths[target]), "64M"])
        host_paths = {target: host_workdir / path.name for target, path in paths.items()}
        xml = domain_xml(name, image, host_paths, host_workdir / "console.log", agent=agent, domain_type=self.domain_type,
                         memory_mib=self.memory_mib)
        dom = self.conn.defineXML(xml)
        guest = Guest(self.conn, dom, name, workdir, paths, agent=agent, root=self.root)
        self.guests.append(guest)
        if running and self.domain_type == "kvm":
            guest.start(wait=False)
            try:  # a booting guest hung under nested KVM on the test bed, silently: fall back to TCG
                guest.wait_console("vmbackup-guest: init", timeout=KVM_HANG_SECONDS)
            except GuestError:
                _KVM_HANGS.append(name)
                self.domain_type = "qemu"
                destroy_vm(dom)
                guest.dom = self.conn.defineXML(xml.replace("<domain type='kvm'>", "<domain type='qemu'>", 1))
            else:
                if wait:
                    guest.wait_ready(boot_timeout)
                return guest
        if running:
            guest.start(wait=wait, timeout=boot_timeout)
        return guest

    def adopt(self, dom, agent: bool = True) -> Guest:
        """A Guest for a domain made by someone else from a test guest (e.g. restored from a
        backup): exec, files, freeze work the same. Its files are not removed by cleanup() (the
        domain is destroyed and undefined); paths come from its XML."""
        root = ET.fromstring(dom.XMLDesc(0))
        paths = {}
        for disk in root.findall("./devices/disk"):
            source, target = disk.find("source"), disk.find("target")
            if source is not None and target is not None and source.get("file"):
                paths[target.get("dev")] = self._local(source.get("file"))
        workdir = paths["vda"].parent if "vda" in paths else self._local(self.images)
        guest = Guest(self.conn, dom, dom.name(), workdir, paths, agent=agent, root=self.root)
        self.adopted.append(guest)
        return guest

    def _local(self, path: str | os.PathLike) -> pathlib.Path:
        return self.root / str(path).lstrip("/") if self.root is not None else pathlib.Path(path)

    def cleanup(self) -> None:
        for guest in self.adopted:
            destroy_vm(guest.dom)
        self.adopted.clear()
        for guest in self.guests:
            try:  # snapshot metadata would keep undefine from succeeding
                for snap in guest.dom.listAllSnapshots(0):
                    snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
            except libvirt.libvirtError:
                pass
            destroy_vm(guest.dom)
            shutil.rmtree(guest.workdir, ignore_errors=True)
        self.guests.clear()


# ----------------------------------------------------------------------------- host-side checks of a data disk
def _as_raw(image: pathlib.Path | str, workdir: pathlib.Path) -> pathlib.Path:
    raw = workdir / f"check-{uuid.uuid4().hex[:8]}.raw"
    run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)])  # format probed: qcow2 or raw
    return raw


def disk_read_file(image: pathlib.Path | str, path: str, workdir: pathlib.Path | None = None) -> bytes:
    """A file's content read from an ext4 disk image on the host (debugfs on a raw copy), not
    through the guest: what really reached the disk. FileNotFoundError when absent. ``path`` is
    relative to the filesystem's root (the guest's /data/x is "/x")."""
    workdir = pathlib.Path(workdir or pathlib.Path(image).parent)
    raw = _as_raw(image, workdir)
    try:
        proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)], capture_output=True, check=False)
        err = proc.stderr.decode(errors="replace")
        if "not found" in err.lower():
            raise FileNotFoundError(path)
        if proc.returncode != 0:
            raise GuestError(f"debugfs cat {path} on {image}: {err}")
        return proc.stdout
    finally:
        raw.unlink(missing_ok=True)


def disk_fsck(image: pathlib.Path | str, workdir: pathlib.Path | None = None) -> tuple[int, str]:
    """e2fsck -fn of an ext4 disk image (a raw copy); (exit code, output). 0 = clean."""
    workdir = pathlib.Path(workdir or pathlib.Path(image).parent)
    raw = _as_raw(image, workdir)
    try:
        proc = run(["e2fsck", "-fn", str(raw)], check=False)
        return proc.returncode, proc.stdout + proc.stderr
    finally:
        raw.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- command line (demo, debugging)
def main(argv: list[str] | None = None) -> int:
    """python tests/integration/guest.py define NAME [--dir DIR] [--no-agent] [--start]
                                          exec NAME -- ARGV...
    define: a persistent test guest (not cleaned up) with its data disk in DIR (default
    /var/lib/libvirt/images/NAME), booting from /var/cache/vmbackup-test-guest (or
    VMBACKUP_GUEST_DIR); prints the directory. exec: runs ARGV in a running guest,
    prints its output and exits with its code."""
    import argparse  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    parser = argparse.ArgumentParser(prog="guest.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_define = sub.add_parser("define")
    p_define.add_argument("name")
    p_define.add_argument("--dir", type=pathlib.Path)
    p_define.add_argument("--no-agent", action="store_true")
    p_define.add_argument("--start", action="store_true")
    p_exec = sub.add_parser("exec")
    p_exec.add_argument("name")
    p_exec.add_argument("argv", nargs="+")
    args = parser.parse_args(argv)
    conn = libvirt.open("qemu:///system")
    if args.cmd == "define":
        # A persistent guest boots from the unversioned default directory, which is never pruned.
        os.environ.setdefault("VMBACKUP_GUEST_DIR", str(GUEST_BASE))
        image = guest_image()
        workdir = args.dir or IMAGES / args.name
        workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(workdir, 0o755)
        disk = workdir / "vda.qcow2"
        if not disk.exists():
            shutil.copyfile(image.data_template, disk)
        dom = conn.defineXML(domain_xml(args.name, image, {"vda": disk}, workdir / "console.log", agent=not args.no_agent,
                                        domain_type=guest_domain_type(conn)))
        guest = Guest(conn, dom, args.name, workdir, {"vda": disk}, agent=not args.no_agent)
        if args.start:
            guest.start()
        print(workdir)
        return 0
    dom = conn.lookupByName(args.name)
    guest = Guest(conn, dom, args.name, IMAGES, {})
    code, out, err = guest.exec(args.argv)
    sys.stdout.buffer.write(out)
    sys.stderr.buffer.write(err)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
