"""The tiny test guest itself (tests/integration/guest.py, scripts/build-test-guest.sh): it boots,
its agent answers, guest-exec reads and writes files in /data that really reach the disk, and
freeze/thaw (with the slow freeze hook) are real. Other tests build on these facts."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

import libvirt
import pytest

from guest import BUILD_SCRIPT, GuestError, disk_fsck, disk_read_file
from harness import URI, run


def ticks(guest) -> list[float]:
    return [float(x) for x in guest.read_file("/data/ticks").split()]


def test_build_is_cached(tiny_guest_image):
    """A second build with the same inputs changes nothing (the stamp matches) and is fast."""
    files = (tiny_guest_image.kernel, tiny_guest_image.vmlinuz, tiny_guest_image.initrd, tiny_guest_image.data_template)
    before = [os.stat(f).st_mtime_ns for f in files]
    start = time.monotonic()
    proc = subprocess.run(["bash", str(BUILD_SCRIPT), str(tiny_guest_image.kernel.parent)], capture_output=True,
                          text=True, check=True)
    assert time.monotonic() - start < 2
    assert proc.stdout.strip() == str(tiny_guest_image.kernel.parent)
    assert [os.stat(f).st_mtime_ns for f in files] == before
    # QEMU runs as libvirt-qemu: the files must be world-readable
    assert all(os.stat(f).st_mode & 0o004 for f in files)


def test_guest_exec_files_freeze_and_power(guests):
    """One guest through its life: boot, exec, files, freeze/thaw (blocks writes for real), slow
    freeze hook, agent shutdown (file on disk, fsck clean), boot again, agent stopped, ACPI off."""
    start = time.monotonic()
    g = guests.create()
    boot = time.monotonic() - start
    print(f"boot to agent answering: {boot:.1f} s")
    assert boot < 60
    assert g.ping()
    assert "vmbackup-guest: data mounted" in g.console(100)

    # exec: exit code, both streams, binary stdin/stdout, timeouts
    assert g.exec(["sh", "-c", "echo out; echo err >&2; exit 3"]) == (3, b"out\n", b"err\n")
    blob = bytes(range(256)) * 64
    assert g.exec(["cat"], input=blob) == (0, blob, b"")
    with pytest.raises(GuestError, match="did not finish within 1s(.|\n)*serial console"):
        g.exec(["sleep", "30"], timeout=1)

    # files in /data, through the guest's filesystem; larger than one agent message either way
    payload = os.urandom(1536 * 1024)
    g.write_file("/data/payload.bin", payload)
    assert g.read_file("/data/payload.bin") == payload
    assert g.sh('sha256sum "$1"', "/data/payload.bin").split()[0].decode() == hashlib.sha256(payload).hexdigest()
    with pytest.raises(ValueError, match="too large"):
        g.exec(["cat"], input=payload)
    with pytest.raises(FileNotFoundError):
        g.read_file("/data/missing")
    assert b"/dev/vda on /data type ext4" in g.sh("mount")

    # freeze/thaw through libvirt: the data filesystem is frozen and writes to it block
    assert g.fsfreeze_status() == "thawed"
    writer = g.spawn(["sh", "-c", "while [ ! -e /run/stop-ticks ]; do cut -d' ' -f1 /proc/uptime >> /data/ticks; sleep 0.1; done"],
                     capture=False)
    time.sleep(0.5)
    assert g.dom.fsFreeze() == 1
    assert g.fsfreeze_status() == "frozen"
    with pytest.raises(libvirt.libvirtError, match="frozen"):  # the agent refuses guest-exec while frozen
        g.agent_command("guest-exec", {"path": "true"})
    time.sleep(1.5)
    assert g.dom.fsThaw() == 1
    assert g.fsfreeze_status() == "thawed"
    time.sleep(0.5)
    g.sh(": > /run/stop-ticks")
    g.wait(writer, timeout=10)
    gaps = [b - a for a, b in zip(ticks(g), ticks(g)[1:])]
    assert max(gaps) > 1.3, gaps  # the writer stood still while frozen (0.1 s apart otherwise)
    assert [line.split()[1] for line in g.freeze_hook_log()] == ["freeze", "thaw"]

    # slow freeze hook: virsh domfsfreeze takes the hook's time, then the guest is frozen
    g.set_slow_freeze(2)
    t0 = time.monotonic()
    run(["virsh", "-c", URI, "domfsfreeze", g.name])
    took = time.monotonic() - t0
    print(f"domfsfreeze with a 2 s hook: {took:.1f} s")
    assert took >= 2
    assert g.fsfreeze_status() == "frozen"
    run(["virsh", "-c", URI, "domfsthaw", g.name])
    assert g.fsfreeze_status() == "thawed"
    g.set_slow_freeze(0)
    t0 = time.monotonic()
    g.dom.fsFreeze()
    assert time.monotonic() - t0 < 1.5
    g.dom.fsThaw()

    # shutdown through the agent: /data unmounted cleanly, the file is on the disk
    g.shutdown(mode="agent")
    assert "vmbackup-guest: power off" in g.console(20)
    assert disk_read_file(g.paths["vda"], "/payload.bin") == payload
    code, out = disk_fsck(g.paths["vda"])
    assert code == 0, out

    # boot again: the data persists; with the agent stopped, freezing fails and ACPI powers off
    g.start()
    assert g.read_file("/data/payload.bin") == payload
    g.stop_agent()
    assert not g.ping()
    with pytest.raises(libvirt.libvirtError):
        g.dom.fsFreeze()
    g.shutdown(mode="acpi")
    assert not g.dom.isActive()
    assert disk_fsck(g.paths["vda"])[0] == 0


def test_guest_without_agent_and_agent_control(guests):
    """agent=False: the guest boots (/init answers on the control port), the agent does not, a
    freeze is refused. Through the control port: the agent started; stopped while frozen (the
    kernel keeps /data frozen, a restarted agent still says frozen until thawed); killed (its
    supervisor restarts it)."""
    g = guests.create(agent=False, extra_disks=1)
    assert "vmbackup.agent=0" in g.xml()
    assert set(g.paths) == {"vda", "vdb"}
    assert g.control("ping") == "ok ping"
    assert not g.ping(timeout=2)
    with pytest.raises(libvirt.libvirtError):
        g.dom.fsFreeze()

    g.start_agent()
    assert g.dom.fsFreeze() == 1
    g.stop_agent()  # while frozen: qemu-ga ignores SIGTERM then, SIGKILL follows
    assert not g.ping(timeout=2)
    assert g.thaw_without_agent() is True    # it was frozen in the kernel
    assert g.thaw_without_agent() is False   # and is no longer
    g.start_agent()
    assert g.fsfreeze_status() == "frozen"   # qemu-ga's state file survived its death
    with pytest.raises(libvirt.libvirtError, match="frozen"):
        g.agent_command("guest-exec", {"path": "true"})
    g.dom.fsThaw()
    assert g.fsfreeze_status() == "thawed"

    g.kill_agent()
    g.wait_agent(timeout=30)
    assert g.exec(["true"])[0] == 0
    g.shutdown()
    assert not g.dom.isActive()
    assert disk_fsck(g.paths["vda"])[0] == 0
