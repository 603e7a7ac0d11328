"""export's quiesce with the tiny real guest: application consistency through the guest agent's
fsfreeze, checked from outside (guest-fsfreeze-status, the guest's freeze-hook log, e2fsck and
debugfs on the restored disk, the manifest file, libvirt), the fallbacks, and a run killed while
the guest freezes."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import time

import libvirt
import pytest

from guest import disk_fsck, disk_read_file
from harness import (
    DiskSpec,
    destroy_vm,
    expect_error,
    expect_ok,
    job_running,
    kill_tree,
    listing,
    module_pids,
    result_and_warnings,
    run,
    wait_for,
)

MARKER_DIR = pathlib.Path("/run/vmbackup-libvirt")


def sets_of(repo: pathlib.Path, uuid: str) -> list[pathlib.Path]:
    sets = repo / "vms" / uuid / "sets"
    return sorted(p for p in sets.iterdir() if p.is_dir()) if sets.is_dir() else []


def manifest(set_dir: pathlib.Path) -> dict:
    return json.loads((set_dir / "manifest.json").read_text())


def bitmaps(image: pathlib.Path) -> list[str]:
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(image)]).stdout)
    return [b["name"] for b in (info.get("format-specific", {}).get("data", {}).get("bitmaps") or [])]


def vm_as_found(dom, images: list[pathlib.Path]) -> tuple:
    """What a failed run must leave exactly as it was: XML (live and inactive), checkpoints,
    bitmaps in the images, run state, no job."""
    return (dom.XMLDesc(0), dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), sorted(c.getName() for c in dom.listAllCheckpoints(0)),
            [bitmaps(i) for i in images], dom.state()[0], job_running(dom))


def hook_events(guest) -> list[tuple[int, str]]:
    """The guest's freeze hook log: (epoch second by the guest's clock, freeze|thaw), written by
    the guest itself after each freeze hook and thaw."""
    return [(int(line.split()[0]), line.split()[1]) for line in guest.freeze_hook_log()]


@pytest.fixture
def restored(ansible, scratch):
    """Restores a set as a new domain into scratch; the domains are removed afterwards."""
    made: list[str] = []

    def restore(repo: pathlib.Path, set_id: str, uuid: str) -> dict:
        name = f"vmbt-qr-{os.urandom(4).hex()}"
        disk_dir = scratch / name
        disk_dir.mkdir(mode=0o711)
        made.append(name)
        return expect_ok(ansible("restore", {"repository": str(repo), "uuid": uuid, "set_id": set_id, "restore_as": name,
                                             "disk_dir": str(disk_dir)}))

    yield restore
    conn = libvirt.open("qemu:///system")
    try:
        for name in made:
            try:
                destroy_vm(conn.lookupByName(name))
            except libvirt.libvirtError:
                pass
    finally:
        conn.close()


def test_required_is_application_consistent_thawed_and_restores_clean(ansible, guests, repo, restored, scratch):
    guest = guests.create()
    before = {f"/data/before-{i}.txt": os.urandom(20000 + i) for i in range(3)}
    for path, data in before.items():
        guest.write_file(path, data)
    args = {"name": guest.name, "repository": str(repo), "quiesce": "required", "quiesce_timeout": 20}

    # Check mode: predicts application (the agent answers), freezes nothing, writes nothing.
    events = hook_events(guest)
    predicted = expect_ok(ansible("export", args, check=True))
    assert predicted["consistency"] == "application" and predicted["quiesce"]["frozen"] is False, predicted
    assert hook_events(guest) == events, "check mode must not freeze"
    assert listing(repo) == [] and guest.dom.listAllCheckpoints(0) == []

    result = expect_ok(ansible("export", args))
    quiesce = result["quiesce"]
    assert result["consistency"] == "application" and quiesce["frozen"] is True and quiesce["filesystems"] >= 1, result
    assert 0 < quiesce["frozen_seconds"] < 20 and quiesce["reason"] is None
    # Independently: the set's manifest, the guest's agent, and the guest's own hook log.
    set_dir = pathlib.Path(result["repository_path"])
    assert manifest(set_dir)["consistency"] == "application"
    assert guest.fsfreeze_status() == "thawed"
    new = hook_events(guest)[len(events):]
    assert [e for _w, e in new] == ["freeze", "thaw"], new
    # The guest's own view of the frozen time (whole seconds) agrees with the reported one.
    assert new[1][0] - new[0][0] <= quiesce["frozen_seconds"] + 1, (new, quiesce)
    guest.write_file("/data/after.txt", b"written after the backup")  # the guest writes again

    info = ansible("backup_info", {"repository": str(repo)})
    assert not info["failed"], info
    assert json.dumps(info).count('"consistency": "application"') >= 1

    # The restored data disk: a clean file system holding what was written before the backup.
    out = restored(repo, result["set_id"], guest.uuid)
    disk = pathlib.Path(next(d["path"] for d in out["disks"] if d["target"] == "vda"))
    code, text = disk_fsck(disk, scratch)
    assert code == 0, text
    for path, data in before.items():
        assert disk_read_file(disk, path[len("/data"):], scratch) == data
    with pytest.raises(FileNotFoundError):
        disk_read_file(disk, "/after.txt", scratch)

    # A second run: an incremental, again frozen and thawed, consistent.
    again = expect_ok(ansible("export", dict(args, quiesce="auto")))
    assert again["type"] == "incremental" and again["consistency"] == "application", again
    assert guest.fsfreeze_status() == "thawed"


def test_without_agent_required_fails_as_found_and_auto_falls_back(ansible, guests, vms, repo):
    guest = guests.create(agent=False)  # the channel exists, no agent answers on it
    images = [guest.paths["vda"]]
    args = {"name": guest.name, "repository": str(repo), "quiesce": "required"}
    found = vm_as_found(guest.dom, images)

    checked = expect_error(ansible("export", args, check=True), "QUIESCE_FAILED")
    assert "not connected" in checked["msg"], checked
    failed = expect_error(ansible("export", args), "QUIESCE_FAILED")
    assert "guest agent" in failed["msg"] and failed["quiesce"]["consistency"] == "crash", failed
    assert vm_as_found(guest.dom, images) == found
    assert sets_of(repo, guest.uuid) == [] and listing(repo / "vms" / guest.uuid / ".incomplete") == []

    result, warnings = result_and_warnings(ansible, "export", dict(args, quiesce="auto"))
    expect_ok(result)
    assert result["consistency"] == "crash" and result["quiesce"]["frozen"] is False
    assert "not connected" in result["quiesce"]["reason"], result
    assert "crash-consistent" in warnings, warnings
    assert manifest(pathlib.Path(result["repository_path"]))["consistency"] == "crash"

    never, warnings = result_and_warnings(ansible, "export", dict(args, quiesce="never"))
    expect_ok(never)
    assert never["consistency"] == "crash" and never["quiesce"]["reason"] == "quiesce=never" and "crash-consistent" not in warnings

    # A VM without any agent channel: crash-consistent, said in the result, no warning (not an anomaly).
    plain = vms.create([DiskSpec("32M")])
    result, warnings = result_and_warnings(ansible, "export", {"name": plain.name, "repository": str(repo)})
    expect_ok(result)
    assert result["consistency"] == "crash" and "no guest agent channel" in result["quiesce"]["reason"]
    assert "crash-consistent" not in warnings, warnings
    # A shut-off VM under required: copied, crash, not a failure (no guest to quiesce).
    plain.dom.destroy()
    copy = expect_ok(ansible("export", {"name": plain.name, "repository": str(repo), "quiesce": "required"}))
    assert copy["type"] == "copy" and copy["consistency"] == "crash" and "shutoff" in copy["quiesce"]["reason"]


def _marker_filled(uuid: str) -> bool:
    path = MARKER_DIR / f"freeze-{uuid}"
    return path.exists() and path.stat().st_size > 0


def _guards(uuid: str) -> list[int]:
    """Processes whose command line names the VM's UUID: the module's thaw guard."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            argv = pathlib.Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.isdigit() and uuid.encode() in argv and any(b"fsThaw" in a for a in argv):
            found.append(int(entry))
    return found


def _hook_started(guest, count: int) -> bool:
    """The guest's freeze hook started for the count-th time (it says so on the serial console
    before its delay)."""
    return guest.console(tail=10000).count("fsfreeze-hook freeze") >= count


def test_run_killed_while_the_guest_freezes(ansible, guests, repo):
    guest = guests.create()
    guest.write_file("/data/payload", os.urandom(100000))
    guest.set_slow_freeze(5)
    args = {"name": guest.name, "repository": str(repo), "quiesce": "required", "quiesce_timeout": 30}

    # 1. Only the module process is killed (SIGKILL) while the guest agent runs the slow freeze:
    #    the guard child sees its pipe close and thaws once the freeze completes. No run needed.
    events = hook_events(guest)
    hooks = guest.console(tail=10000).count("fsfreeze-hook freeze")
    proc = ansible.popen("export", args)
    wait_for(lambda: _hook_started(guest, hooks + 1), 120, what="the module to start freezing")
    time.sleep(1)
    pids = module_pids(proc, "export")
    assert pids, "the module process to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=60) != 0
    assert _guards(guest.uuid), "the guard outlives the module"
    wait_for(lambda: guest.ping(timeout=2) and guest.fsfreeze_status() == "thawed", 60, interval=0.5,
             what="the guard to thaw the guest")
    new = [e for _w, e in hook_events(guest)[len(events):]]
    assert new == ["freeze", "thaw"], new  # it really froze (after the kill) and was thawed
    wait_for(lambda: not _guards(guest.uuid), 30, what="the guard to end")

    # 2. The module and its guard are killed together (the whole process tree): the guest stays
    #    frozen after the freeze completes, until the next run of the collection thaws it first.
    assert not _marker_filled(guest.uuid), "the guard empties the marker of the dead run after its thaw"
    proc = ansible.popen("export", args)
    wait_for(lambda: _hook_started(guest, hooks + 2), 120, what="the module to start freezing")
    time.sleep(1)
    assert _marker_filled(guest.uuid)
    kill_tree(proc)
    time.sleep(6)  # the freeze hook ends, the guest freezes
    assert guest.fsfreeze_status() == "frozen"
    time.sleep(2)
    assert guest.fsfreeze_status() == "frozen", "nothing else may thaw it"

    predicted = expect_ok(ansible("export", dict(args, quiesce="never"), check=True))
    assert any("thaw" in item for item in predicted["would_clean_up"]), predicted
    assert predicted["quiesce"]["thawed_leftover"] is True
    assert guest.fsfreeze_status() == "frozen", "check mode must not thaw"

    result = expect_ok(ansible("export", dict(args, quiesce="never")))
    assert guest.fsfreeze_status() == "thawed"
    assert result["quiesce"]["thawed_leftover"] is True, result
    assert any("thawed the guest" in item for item in result["cleaned_up"]), result
    assert any("incomplete set" in item for item in result["cleaned_up"]), result  # the killed runs' staging
    assert result["consistency"] == "crash"
    assert not _marker_filled(guest.uuid)
    guest.write_file("/data/after", b"the guest writes again")

    # 3. A freeze slower than quiesce_timeout: given up, the guest thawed, crash with auto, and
    #    required fails, leaving no set behind.
    slow = expect_ok(ansible("export", dict(args, quiesce="auto", quiesce_timeout=2)))
    assert slow["consistency"] == "crash" and "within quiesce_timeout" in slow["quiesce"]["reason"], slow
    assert guest.fsfreeze_status() == "thawed"
    sets = sets_of(repo, guest.uuid)
    failed = expect_error(ansible("export", dict(args, quiesce_timeout=2)), "QUIESCE_FAILED")
    assert "within quiesce_timeout" in failed["msg"], failed
    assert guest.fsfreeze_status() == "thawed" and sets_of(repo, guest.uuid) == sets
    assert listing(repo / "vms" / guest.uuid / ".incomplete") == []

    # 4. A cancel (SIGTERM, what AWX sends) while the guest freezes: rolled back, thawed, no set.
    guest.set_slow_freeze(4)
    hooks = guest.console(tail=10000).count("fsfreeze-hook freeze")
    pending = ansible.popen_result("export", args)
    wait_for(lambda: _hook_started(guest, hooks + 1), 120, what="the module to start freezing")
    time.sleep(1)
    pids = module_pids(pending.proc, "export")
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    cancelled = expect_error(pending.result(timeout=120), "CANCELLED")
    assert guest.fsfreeze_status() == "thawed", cancelled
    assert sets_of(repo, guest.uuid) == sets and listing(repo / "vms" / guest.uuid / ".incomplete") == []
    assert not _marker_filled(guest.uuid) and not _guards(guest.uuid)
