"""vmbackup.libvirt.export series, periodic fulls and the shut-off economy, on real libvirtd and QEMU.

Independent checks only: `virsh checkpoint-list` for the checkpoints, QEMU's own bitmap list,
`qemu-img compare` of every point read through its chain against a copy of the disk taken at
backup time, `qemu-img info` for image chains, and the repository tree itself.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
import xml.etree.ElementTree as ET

import libvirt
import libvirt_qemu

from harness import DiskSpec, Domains, MIB, chain_json, expect_ok, images_equal, make_dir, result_and_warnings, run, tree_state

# A state recorded within a second of the last write is not trusted (see skip_unchanged), so
# each offline change is followed by this pause before the copy that is to record its state.
SETTLE = 1.2


def virsh_checkpoints(vm) -> set[str]:
    """The checkpoints libvirt lists, read through virsh, not the module or the binding."""
    out = run(["virsh", "-c", "qemu:///system", "checkpoint-list", "--name", vm.dom.UUIDString()]).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def qemu_bitmaps(vm, target: str = "vda") -> set[str]:
    """The dirty bitmaps QEMU holds on the disk's node (query-block), whatever libvirt says."""
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(vm.dom, '{"execute":"query-block"}', 0))
    for dev in reply["return"]:
        if dev.get("qdev") in (f"ua-{target}", f"/machine/peripheral/ua-{target}/virtio-backend"):
            return {b["name"] for b in dev.get("inserted", {}).get("dirty-bitmaps", [])}
    raise AssertionError(f"no block device for {target}: {reply}")


def set_file(result: dict, target: str = "vda") -> str:
    return str(pathlib.Path(result["repository_path"]) / "disks" / f"{target}.qcow2")


def manifest(result: dict) -> dict:
    return json.loads((pathlib.Path(result["repository_path"]) / "manifest.json").read_text())


def assert_point(results: list[dict], ref: pathlib.Path) -> None:
    same, out = images_equal(chain_json([set_file(r) for r in results]), str(ref))
    assert same, out


def free_now(path: pathlib.Path) -> int:
    vfs = os.statvfs(path)
    return vfs.f_bavail * vfs.f_frsize


# ----------------------------------------------------------------------------- series of chains
def test_two_series_keep_their_own_chain_checkpoint_and_period(ansible, conn, vms, repo, scratch):
    """weekly full, monthly full, weekly incremental: the monthly's first run must not spoil the
    weekly bitmap, each series keeps exactly one checkpoint, and periods count per series."""
    vm = vms.create([DiskSpec("32M", fill=[(0x11, "0", "2M")])])
    base = {"name": vm.name, "repository": str(repo)}
    weekly = dict(base, series="weekly", period="2026-W49")
    monthly = dict(base, series="monthly", period="2026-12")

    w1 = expect_ok(ansible("export", weekly))
    assert (w1["type"], w1["series"]) == ("full", "weekly") and manifest(w1)["series"] == "weekly"
    vm.write("vda", 0xA1, "4M", "1M")
    # A set of the same period key in another series does not count for this one.
    m1 = expect_ok(ansible("export", dict(monthly, period="2026-W49")))
    assert m1["type"] == "full" and m1["chain_id"] != w1["chain_id"], m1
    assert "no committed set of series monthly" in m1["reason"], m1
    assert virsh_checkpoints(vm) == {w1["checkpoint"], m1["checkpoint"]}
    vm.write("vda", 0xB2, "8M", "1M")
    ref_w2 = vm.snapshot_disk("vda", scratch / "w2.qcow2")

    predicted = ansible("export", dict(weekly, period="2026-W50"), check=True)
    w2 = expect_ok(ansible("export", dict(weekly, period="2026-W50")))
    assert (w2["type"], w2["parent"], w2["reason"]) == ("incremental", w1["set_id"], predicted["reason"]), w2
    assert predicted["parent"] == w1["set_id"] and predicted["series"] == "weekly"
    # The weekly bitmap saw both writes, also the one before the monthly full.
    assert_point([w1, w2], ref_w2)
    assert w2["data_bytes"] >= 2 * MIB, w2
    domains = Domains(conn, "series")
    try:  # and restored by the restore module as a new VM
        restored = expect_ok(ansible("restore", {"repository": str(repo), "name": vm.name, "set_id": w2["set_id"],
                                                 "restore_as": domains.new_name(), "disk_dir": str(make_dir(repo.parent / "restored"))}))
        same, out = images_equal(restored["disks"][0]["path"], str(ref_w2))
        assert same and restored["chain"] == [w1["set_id"], w2["set_id"]], (out, restored["chain"])
    finally:
        domains.cleanup()
    assert virsh_checkpoints(vm) == {w2["checkpoint"], m1["checkpoint"]}, "exactly one checkpoint per series"
    assert {w1["checkpoint"]} & qemu_bitmaps(vm) == set(), "the retired checkpoint's bitmap is gone from QEMU"

    vm.write("vda", 0xC3, "12M", "1M")
    ref_m2 = vm.snapshot_disk("vda", scratch / "m2.qcow2")
    m2 = expect_ok(ansible("export", monthly))
    assert (m2["type"], m2["parent"], m2["series"]) == ("incremental", m1["set_id"], "monthly"), m2
    assert_point([m1, m2], ref_m2)
    assert virsh_checkpoints(vm) == {w2["checkpoint"], m2["checkpoint"]}

    # Period idempotence per series: each rerun returns its own series' set, nothing is written.
    state = tree_state(repo)
    again_w = ansible("export", dict(weekly, period="2026-W50"))
    again_m = ansible("export", monthly)
    assert not again_w["changed"] and again_w["set_id"] == w2["set_id"] and again_w["series"] == "weekly", again_w
    assert not again_m["changed"] and again_m["set_id"] == m2["set_id"] and again_m["series"] == "monthly", again_m
    assert tree_state(repo) == state and virsh_checkpoints(vm) == {w2["checkpoint"], m2["checkpoint"]}

    # The weekly chain still extends from its own parent after the monthly runs.
    vm.write("vda", 0xD4, "16M", "1M")
    ref_w3 = vm.snapshot_disk("vda", scratch / "w3.qcow2")
    w3 = expect_ok(ansible("export", dict(weekly, period="2026-W51")))
    assert (w3["type"], w3["parent"]) == ("incremental", w2["set_id"]), w3
    assert_point([w1, w2, w3], ref_w3)
    assert virsh_checkpoints(vm) == {w3["checkpoint"], m2["checkpoint"]}

    # A default-series run is a third series: a full beside them, nobody's checkpoint retired.
    d1 = expect_ok(ansible("export", base))
    assert d1["type"] == "full" and d1["series"] == "default", d1
    assert virsh_checkpoints(vm) == {w3["checkpoint"], m2["checkpoint"], d1["checkpoint"]}


def test_another_series_checkpoint_lost_from_libvirt_keeps_its_bitmap(ansible, vms, repo, scratch):
    """The orphaned-bitmap cleanup of one series leaves alone the bitmap of another series' kept
    checkpoint that libvirt lost: that series redefines it and continues its chain."""
    vm = vms.create([DiskSpec("32M", fill=[(0x21, "0", "2M")])])
    base = {"name": vm.name, "repository": str(repo)}
    w1 = expect_ok(ansible("export", dict(base, series="weekly")))
    m1 = expect_ok(ansible("export", dict(base, series="monthly")))
    vm.dom.checkpointLookupByName(m1["checkpoint"]).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    assert virsh_checkpoints(vm) == {w1["checkpoint"]} and m1["checkpoint"] in qemu_bitmaps(vm)
    vm.write("vda", 0x22, "4M", "1M")

    w2 = expect_ok(ansible("export", dict(base, series="weekly")))
    assert w2["type"] == "incremental" and m1["checkpoint"] in qemu_bitmaps(vm), w2
    assert not [c for c in w2["cleaned_up"] if m1["checkpoint"] in c], w2["cleaned_up"]

    vm.write("vda", 0x23, "8M", "1M")
    ref = vm.snapshot_disk("vda", scratch / "m2.qcow2")
    m2 = expect_ok(ansible("export", dict(base, series="monthly")))
    assert m2["type"] == "incremental" and "redefined" in m2["reason"], m2
    assert_point([m1, m2], ref)
    assert virsh_checkpoints(vm) == {w2["checkpoint"], m2["checkpoint"]}


def test_a_damaged_set_of_another_series_does_not_stop_this_series_chain(ansible, vms, repo, scratch):
    """A damaged manifest's series is unknown: the weekly chain continues from its own newest
    readable set (with a warning), and the monthly series, whose only set it was, takes a full."""
    vm = vms.create([DiskSpec("32M", fill=[(0x71, "0", "2M")])])
    base = {"name": vm.name, "repository": str(repo)}
    w1 = expect_ok(ansible("export", dict(base, series="weekly")))
    m1 = expect_ok(ansible("export", dict(base, series="monthly")))
    path = pathlib.Path(m1["repository_path"]) / "manifest.json"
    os.chmod(path.parent, 0o700)
    os.chmod(path, 0o600)
    path.write_bytes(path.read_bytes()[:-30])  # no longer JSON
    os.chmod(path, 0o400)
    vm.write("vda", 0x72, "4M", "1M")
    ref = vm.snapshot_disk("vda", scratch / "w2.qcow2")

    w2, warnings = result_and_warnings(ansible, "export", dict(base, series="weekly"))
    assert (w2["changed"], w2["type"], w2["parent"]) == (True, "incremental", w1["set_id"]), w2
    assert f"set(s) {m1['set_id']} are unreadable (series unknown)" in warnings, warnings
    assert_point([w1, w2], ref)
    m2 = expect_ok(ansible("export", dict(base, series="monthly")))
    assert m2["type"] == "full" and f"the last set {m1['set_id']} is unreadable" in m2["reason"], m2
    assert virsh_checkpoints(vm) == {w2["checkpoint"], m2["checkpoint"]}


# ----------------------------------------------------------------------------- periodic fulls
def test_full_every_sets_and_days_start_new_chains(ansible, vms, repo, scratch):
    vm = vms.create([DiskSpec("32M", fill=[(0x31, "0", "2M")])])
    args = {"name": vm.name, "repository": str(repo), "series": "weekly", "full_every_sets": 3}
    runs = [expect_ok(ansible("export", args))]
    for i in range(2):
        vm.write("vda", 0x32 + i, f"{4 * (i + 1)}M", "1M")
        runs.append(expect_ok(ansible("export", args)))
    assert [r["type"] for r in runs] == ["full", "incremental", "incremental"], runs
    ref = vm.snapshot_disk("vda", scratch / "third.qcow2")
    assert_point(runs, ref)

    predicted = ansible("export", args, check=True)
    fourth = expect_ok(ansible("export", args))
    want = f"full: the chain of set {runs[-1]['set_id']} has 3 sets (full_every_sets=3)"
    assert (predicted["type"], predicted["reason"]) == ("full", want), predicted
    assert (fourth["type"], fourth["reason"]) == ("full", want) and fourth["chain_id"] != runs[0]["chain_id"], fourth
    assert virsh_checkpoints(vm) == {fourth["checkpoint"]}

    # full_every_days: the chain's full is a second old; a day-long rule keeps the chain going,
    # one of ~0.9 s (1e-5 days) ends it.
    time.sleep(1.0)
    days = dict(args, full_every_sets=None, full_every_days=1)
    assert ansible("export", days, check=True)["type"] == "incremental"
    days["full_every_days"] = 0.00001
    predicted = ansible("export", days, check=True)
    fifth = expect_ok(ansible("export", days))
    assert fifth["type"] == predicted["type"] == "full", fifth
    assert fifth["reason"] == predicted["reason"], (fifth["reason"], predicted["reason"])
    assert fifth["reason"].startswith(f"full: the full {fourth['set_id']} of the chain started ") and \
        fifth["reason"].endswith("days ago (full_every_days=1e-05)"), fifth["reason"]
    assert virsh_checkpoints(vm) == {fifth["checkpoint"]}

    for bad in ({"full_every_sets": 0}, {"full_every_days": 0}, {"full_every_days": -1}, {"series": "Weekly"}):
        failed = ansible("export", dict(args, **bad))
        assert failed["failed"] and failed["error_code"] in ("INVALID_ARGUMENT", "INVALID_NAME"), (bad, failed)


# ----------------------------------------------------------------------------- shut-off economy
def _overlay_vm(vms) -> tuple[object, pathlib.Path, pathlib.Path]:
    """A shut-off VM whose disk is an overlay over a base image: a chain of two files."""
    vm = vms.create([DiskSpec("32M", fill=[(0x41, "0", "2M")])], running=False)
    base = vm.disks["vda"]
    top = vm.workdir / "top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 4M 1M", str(top)])
    xml = vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace(str(base), str(top))
    vm.dom = vm.conn.defineXML(xml)
    vm.disks["vda"] = top
    return vm, top, base


def test_unchanged_shut_off_vm_is_not_copied_again(ansible, vms, repo):
    vm, top, base = _overlay_vm(vms)
    args = {"name": vm.name, "repository": str(repo), "series": "nightly"}

    def copied(reason_part: str, **extra) -> dict:
        """A run that must copy, with what differed in its reason; then rerun: unchanged."""
        time.sleep(SETTLE)
        predicted = ansible("export", dict(args, **extra), check=True)
        result = expect_ok(ansible("export", dict(args, **extra)))
        assert result["type"] == "copy" and reason_part in result["reason"], result["reason"]
        assert (predicted["changed"], predicted["reason"]) == (True, result["reason"]), predicted
        same, out = images_equal(str(top), set_file(result), force_share=False)
        assert same, out
        return result

    def unchanged(last: dict) -> None:
        state = tree_state(repo)
        predicted = ansible("export", args, check=True)
        again = ansible("export", args)
        for r in (predicted, again):
            assert not r["changed"] and not r["failed"] and r["set_id"] == last["set_id"], r
            assert r["reason"].startswith(f"unchanged since set {last['set_id']}"), r["reason"]
            assert r["bytes_written"] == 0 and r["series"] == "nightly" and r["repository_free_bytes"] > 0, r
        assert tree_state(repo) == state

    first = copied("shut off")
    images = manifest(first)["disks"][0]["images"]
    chain = json.loads(run(["qemu-img", "info", "--backing-chain", "--output=json", str(top)]).stdout)
    assert [i["path"] for i in images] == [c["filename"] for c in chain] == [str(top), str(base)], images
    st = top.stat()
    assert (images[0]["size"], images[0]["mtime_ns"], images[0]["ctime_ns"], images[0]["ino"]) == \
        (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    unchanged(first)

    # One byte written offline into the top image, then into the base image under it.
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 1", str(top)])
    last = copied(f"image {top} of disk vda changed since set {first['set_id']}")
    unchanged(last)
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5b 20M 1", str(base)])
    last = copied(f"image {base} of disk vda changed since set {last['set_id']}")
    unchanged(last)

    # Same content, new mtime; then mtime set back exactly (only the ctime tells): both copy.
    os.utime(top, ns=(st.st_atime_ns, time.time_ns()))
    last = copied("(mtime_ns, ctime_ns)")
    unchanged(last)
    st = top.stat()
    time.sleep(0.01)
    os.utime(top, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert top.stat().st_mtime_ns == st.st_mtime_ns and top.stat().st_ctime_ns != st.st_ctime_ns
    last = copied("(ctime_ns)")
    unchanged(last)

    # The domain XML changed (a description), nothing else.
    root = ET.fromstring(vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    ET.SubElement(root, "description").text = "changed"
    vm.dom = vm.conn.defineXML(ET.tostring(root, encoding="unicode"))
    last = copied("the domain XML changed")
    unchanged(last)

    # Started and stopped, the guest writing nothing: libvirt's chown on start and stop changes
    # the ctime, so the run copies (the stat cannot tell that nothing was written).
    before = top.stat()
    vm.dom.create()
    vm.dom.destroy()
    after = top.stat()
    assert after.st_mtime_ns == before.st_mtime_ns and after.st_ctime_ns != before.st_ctime_ns, (before, after)
    last = copied("(ctime_ns)")
    unchanged(last)

    # skip_unchanged=false copies anyway; another series has its own newest set.
    forced = copied("skip_unchanged=false", skip_unchanged=False)
    assert forced["set_id"] != last["set_id"]
    other = expect_ok(ansible("export", dict(args, series="offsite")))
    assert other["type"] == "copy" and other["series"] == "offsite"
    again = ansible("export", dict(args, series="offsite"))
    assert not again["changed"] and again["set_id"] == other["set_id"], again
    unchanged(forced)
    assert virsh_checkpoints(vm) == set()


def test_a_vm_that_stopped_is_copied_twice_then_unchanged(ansible, vms, repo):
    """The series' first copy after the VM stopped retires the running VM's checkpoint, and with
    a shut-off VM that means removing its bitmaps from the image with qemu-img: the image changed
    after the copy recorded it, so the second night copies again; the third is unchanged. The
    next backup of the running VM is a full (the series' newest set is a copy)."""
    vm = vms.create([DiskSpec("32M", fill=[(0x51, "0", "2M")])])
    args = {"name": vm.name, "repository": str(repo), "series": "weekly"}
    running = expect_ok(ansible("export", args))
    vm.dom.destroy()
    time.sleep(SETTLE)
    copy = expect_ok(ansible("export", args))
    assert copy["type"] == "copy" and virsh_checkpoints(vm) == set(), copy
    bitmaps = json.loads(run(["qemu-img", "info", "--output=json", str(vm.disks["vda"])]).stdout)
    assert not bitmaps["format-specific"]["data"].get("bitmaps"), "the retired checkpoint's bitmaps left the image"
    assert running["checkpoint"] not in json.dumps(bitmaps)
    time.sleep(SETTLE)
    second = expect_ok(ansible("export", args))
    assert second["type"] == "copy" and f"changed since set {copy['set_id']}" in second["reason"], second
    third = ansible("export", args)
    assert not third["changed"] and third["set_id"] == second["set_id"], third
    vm.dom.create()
    full = expect_ok(ansible("export", args))
    assert full["type"] == "full" and f"the last set {second['set_id']} is a copy" in full["reason"], full
    assert virsh_checkpoints(vm) == {full["checkpoint"]}


def test_results_report_series_and_free_space(ansible, vms, repo_root):
    """repository_free_bytes is the free space of the repository's own file system (a tmpfs only
    this test writes to, so the figure is exact) in check mode, after a run and on a rerun. The VM
    is shut off: QEMU, started before the mount, would not see the tmpfs."""
    vm = vms.create([DiskSpec("32M", fill=[(0x61, "0", "1M")])], running=False)
    mnt = make_dir(repo_root / "fs")
    run(["mount", "-t", "tmpfs", "-o", "size=96M,mode=0711", "tmpfs", str(mnt)])
    try:
        args = {"name": vm.name, "repository": str(mnt / "repo"), "period": "p1", "create_repository": True}
        for check in (True, False, False, True):
            result = ansible("export", args, check=check)
            assert result["series"] == "default" and not result["failed"], result
            assert result["repository_free_bytes"] == free_now(mnt), (check, result["repository_free_bytes"], free_now(mnt))
        assert free_now(mnt) < 96 * MIB - MIB
    finally:
        run(["umount", str(mnt)])
