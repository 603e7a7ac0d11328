"""vmbackup.libvirt.restore against a real libvirtd and QEMU.

Every restored image is checked against a reference copy of the VM's disk taken right after
the export of that point (qemu-img compare), and every restored domain through libvirt's own
XML: another path than the module's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import json
import os
import pathlib
import shutil
import uuid
import xml.etree.ElementTree as ET

import libvirt
import pytest

from harness import (
    DiskSpec,
    Domains,
    MIB,
    PREFIX,
    VmFactory,
    allocated_data_bytes,
    expect_error,
    expect_ok,
    images_equal,
    kill_tree,
    listing,
    make_dir,
    run,
    sha256,
    tree_state,
    wait_for,
)

# As conftest.REPO_BASE: QEMU (libvirt-qemu) can traverse it.
REPO_BASE = pathlib.Path("/var/tmp/vmbackup-tests")
NVRAM_DIR = pathlib.Path("/var/lib/libvirt/qemu/nvram")
META_NS = "https://vmbackup.libvirt/xmlns/restore/1"
# A file that exists on every QEMU install: the loader of the NVRAM test is never run.
LOADER = "/usr/share/qemu/bios-256k.bin"


# ----------------------------------------------------------------------------- helpers
def manifest_of(repo: pathlib.Path, vm_uuid: str, set_id: str) -> dict:
    return json.loads((repo / "vms" / vm_uuid / "sets" / set_id / "manifest.json").read_text())


def parse_time(stamp: str) -> dt.datetime:
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def iso(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def inactive_xml(dom) -> ET.Element:
    return ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def disk_map(dom) -> dict[str, tuple[str | None, str | None, str]]:
    """target -> (source file, driver type, device) of a domain, read from libvirt."""
    out = {}
    for disk in inactive_xml(dom).findall("./devices/disk"):
        source = disk.find("source")
        driver = disk.find("driver")
        out[disk.find("target").get("dev")] = (
            source.get("file") if source is not None else None,
            driver.get("type") if driver is not None else None,
            disk.get("device", "disk"),
        )
    return out


def macs(dom) -> list[str]:
    return [m.get("address") for m in inactive_xml(dom).findall("./devices/interface/mac")]


def marker(dom) -> dict[str, str] | None:
    el = inactive_xml(dom).find(f"./metadata/{{{META_NS}}}restore")
    return dict(el.attrib) if el is not None else None


def image_info(path: str | pathlib.Path) -> dict:
    return json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)


def flip_bit(path: pathlib.Path, offset: int) -> None:
    """Damage a committed (0400) file: one bit at ``offset``."""
    mode = path.stat().st_mode & 0o777
    os.chmod(path, mode | 0o200)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))
    os.chmod(path, mode)


def wait_past(stamp: str) -> None:
    """Until the clock is a second past a manifest time: the next set completes strictly later."""
    limit = parse_time(stamp) + dt.timedelta(seconds=1)
    wait_for(lambda: dt.datetime.now(dt.timezone.utc) >= limit, timeout=5, interval=0.05, what="the next second")


def qemu_io_write(path: pathlib.Path, fmt: str, pattern: int, offset: str, length: str) -> None:
    run(["qemu-io", "-f", fmt, "-c", f"write -P {pattern:#x} {offset} {length}", str(path)])


def define_domain(conn, domain_type: str, name: str, devices: str, os_extra: str = "", head: str = "") -> object:
    xml = (
        f"<domain type='{domain_type}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>{head}"
        f"<os><type arch='x86_64' machine='pc'>hvm</type>{os_extra}</os><features><acpi/></features>"
        f"<devices>{devices}</devices></domain>"
    )
    return conn.defineXML(xml)


def file_disk(path: pathlib.Path, target: str, fmt: str = "qcow2", extra: str = "", device: str = "disk") -> str:
    return (f"<disk type='file' device='{device}'><driver name='qemu' type='{fmt}'/><source file='{path}'/>"
            f"<target dev='{target}' bus='{'ide' if device == 'cdrom' else 'virtio'}'/>{extra}</disk>")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture
def domains(conn):
    registry = Domains(conn)
    yield registry
    registry.cleanup()


@pytest.fixture
def disk_dir(repo_root) -> pathlib.Path:
    return make_dir(repo_root / "images")


@pytest.fixture(scope="module")
def module_dir():
    REPO_BASE.mkdir(mode=0o711, exist_ok=True)
    os.chmod(REPO_BASE, 0o711)
    path = make_dir(REPO_BASE / f"restore-{uuid.uuid4().hex[:10]}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def module_domains(conn):
    registry = Domains(conn)
    yield registry
    registry.cleanup()


@pytest.fixture(scope="module")
def module_vms(conn, domain_type):
    factory = VmFactory(conn, domain_type)
    yield factory
    factory.cleanup()


@dataclasses.dataclass
class Point:
    set_id: str
    manifest: dict
    refs: dict[str, pathlib.Path]  # target -> reference copy of the disk right after this export


@dataclasses.dataclass
class ChainFixture:
    vm: object
    repo: pathlib.Path
    points: list[Point]
    tree: dict
    checkpoints: list[str]

    @property
    def set_ids(self) -> list[str]:
        return [p.set_id for p in self.points]

    def args(self, **kw) -> dict:
        args = {"repository": str(self.repo), "name": self.vm.name}
        args.update({k: str(v) if isinstance(v, pathlib.Path) else v for k, v in kw.items()})
        return args


# What is written between the exports: (target, pattern, offset, length). vdb is left alone
# between the full and the first incremental (an empty incremental), the raw vdc between the
# first and the second.
WRITES = [
    [("vda", 0x12, "2M", "2M"), ("vdc", 0x32, "1M", "1M")],
    [("vda", 0x13, "40M", "1M"), ("vdb", 0x22, "5M", "1M")],
    [("vda", 0x14, "2M", "512K"), ("vdb", 0x23, "30M", "2M"), ("vdc", 0x33, "8M", "1M")],
]
TARGETS = ("vda", "vdb", "vdc")


@pytest.fixture(scope="module")
def chain(ansible, module_vms, module_dir) -> ChainFixture:
    """A running VM with two qcow2 disks and a raw one: a full and three incrementals, with a
    reference copy of every disk right after every export."""
    vm = module_vms.create([
        DiskSpec("64M", fill=[(0x11, "0", "8M")]),
        DiskSpec("64M", fill=[(0x21, "4M", "4M")]),
        DiskSpec("32M", fmt="raw", fill=[(0x31, "0", "2M")]),
    ])
    repo = make_dir(module_dir / "repo")  # an existing empty directory: export initialises it
    refs_dir = make_dir(module_dir / "refs")
    points = []
    for k in range(len(WRITES) + 1):
        if k:
            for target, pattern, offset, length in WRITES[k - 1]:
                vm.write(target, pattern, offset, length)
        result = ansible("export", {"name": vm.name, "repository": str(repo)})
        assert result["changed"] and result["type"] == ("incremental" if k else "full"), result
        refs = {tg: vm.snapshot_disk(tg, refs_dir / f"{k}-{tg}.qcow2") for tg in TARGETS}
        manifest = manifest_of(repo, vm.uuid, result["set_id"])
        points.append(Point(result["set_id"], manifest, refs))
        wait_past(manifest["completed"])
    return ChainFixture(vm, repo, points, tree_state(repo), vm.checkpoints())


@dataclasses.dataclass
class Restored:
    point: Point
    name: str
    result: dict


@pytest.fixture(scope="module")
def restored_points(ansible, chain, module_dir, module_domains) -> tuple[pathlib.Path, list[Restored]]:
    """Every point of the chain restored under a new name, by set id; the newest is started."""
    disk_dir = make_dir(module_dir / "restored")
    out = []
    for k, point in enumerate(chain.points):
        name = module_domains.new_name()
        newest = k == len(chain.points) - 1
        result = ansible("restore", chain.args(set_id=point.set_id, restore_as=name, disk_dir=disk_dir, start=newest))
        expect_ok(result)
        out.append(Restored(point, name, result))
    return disk_dir, out


# ----------------------------------------------------------------------------- round trips
def test_every_point_restores_exactly_its_data(chain, restored_points):
    disk_dir, restored = restored_points
    ids = chain.set_ids
    for k, r in enumerate(restored):
        assert r.result["set_id"] == r.point.set_id
        assert r.result["chain"] == ids[:k + 1], "the chain is read from the full up to the point, never past it"
        assert r.result["point"]["type"] == ("incremental" if k else "full")
        assert r.result["source_vm"] == {"name": chain.vm.name, "uuid": chain.vm.uuid}
        disks = {d["target"]: d for d in r.result["disks"]}
        assert sorted(disks) == list(TARGETS)
        for target in TARGETS:
            disk = disks[target]
            assert disk["path"] == str(disk_dir / f"{r.name}-{target}-{r.point.set_id}.qcow2")
            assert disk["format"] == "qcow2"
            # The raw disk is copied whole in every set: its chain is the point alone.
            assert disk["chain"] == ([r.point.set_id] if target == "vdc" else ids[:k + 1])
            same, out = images_equal(disk["path"], str(r.point.refs[target]))
            assert same, f"point {k} disk {target}: {out}"
            if k + 1 < len(restored):
                later = chain.points[k + 1].refs[target]
                if not images_equal(str(r.point.refs[target]), str(later))[0]:
                    assert not images_equal(disk["path"], str(later))[0], f"point {k} {target} reads past its point"
            info = image_info(disk["path"])
            assert info["format"] == "qcow2" and "backing-filename" not in info
            assert info["virtual-size"] == disk["virtual_size"] == chain.vm.dom.blockInfo(target)[0]
        # What the module says it read: exactly the files of the point's chain (and the domain XML).
        expected = 0
        for target in TARGETS:
            for sid in disks[target]["chain"]:
                expected += next(d["size"] for d in chain.points[ids.index(sid)].manifest["disks"] if d["target"] == target)
        expected += r.point.manifest["files"]["domain.xml"]["size"]
        assert r.result["bytes_read"] == expected
    # The writes between the exports really made the points differ (the test has teeth).
    for k in range(len(restored) - 1):
        assert not images_equal(str(chain.points[k].refs["vda"]), str(chain.points[k + 1].refs["vda"]))[0]
    assert images_equal(str(chain.points[0].refs["vdb"]), str(chain.points[1].refs["vdb"]))[0]


def test_restored_domains_have_a_new_identity(conn, chain, restored_points):
    _disk_dir, restored = restored_points
    original_xml = inactive_xml(chain.vm.dom)
    for r in restored:
        dom = conn.lookupByName(r.name)
        assert dom.UUIDString() != chain.vm.uuid
        assert r.result["vm"]["name"] == r.name and r.result["vm"]["uuid"] == dom.UUIDString()
        assert r.result["vm"]["replaced"] is False
        sources = disk_map(dom)
        assert {tg: s[:2] for tg, s in sources.items()} == {d["target"]: (d["path"], "qcow2") for d in r.result["disks"]}
        assert dom.listAllCheckpoints() == []
        assert marker(dom) == {"vm_uuid": chain.vm.uuid, "vm_name": chain.vm.name, "set_id": r.point.set_id,
                               "restored": marker(dom)["restored"]}
        assert inactive_xml(dom).findtext("name") == r.name
        assert ET.fromstring(r.result["domain_xml"]).findtext("name") == r.name
    # The original is untouched: it runs, keeps its checkpoint, its disks and definition.
    assert chain.vm.dom.isActive()
    assert chain.vm.checkpoints() == chain.checkpoints
    assert ET.tostring(inactive_xml(chain.vm.dom)) == ET.tostring(original_xml)
    for target in TARGETS:
        assert images_equal(str(chain.vm.disks[target]), str(chain.points[-1].refs[target]))[0]


def test_started_restore_runs_beside_the_original(conn, chain, restored_points):
    _disk_dir, restored = restored_points
    newest = restored[-1]
    assert newest.result["started"] is True and newest.result["vm"]["state"] == "running"
    assert conn.lookupByName(newest.name).isActive()
    assert chain.vm.dom.isActive()
    for r in restored[:-1]:
        assert r.result["started"] is False and r.result["vm"]["state"] == "shutoff"
        assert not conn.lookupByName(r.name).isActive()


def test_restoring_the_same_point_again_changes_nothing(ansible, chain, restored_points):
    disk_dir, restored = restored_points
    before = listing(disk_dir)
    for r in (restored[0], restored[-1]):
        args = chain.args(set_id=r.point.set_id, restore_as=r.name, disk_dir=disk_dir)
        if r is restored[0]:
            assert ansible("restore", args, check=True)["changed"] is False
        again = ansible("restore", args)
        assert again["changed"] is False and not again["failed"], again
        assert again["set_id"] == r.point.set_id
    assert listing(disk_dir) == before
    # Restores never write the repository (the shared lock leaves the lock file as it was).
    assert tree_state(chain.repo) == chain.tree


def test_restore_leaves_no_trace_in_the_repository(chain, restored_points):
    disk_dir, _restored = restored_points
    assert tree_state(chain.repo) == chain.tree
    assert not [n for n in listing(disk_dir) if n.startswith(".")], "no journal or partial file is left"


def test_raw_format_gives_sparse_raw_images(ansible, chain, disk_dir, domains):
    point = chain.points[1]
    name = domains.new_name()
    result = expect_ok(ansible("restore", chain.args(set_id=point.set_id, restore_as=name, disk_dir=disk_dir,
                                                     disk_format="raw", workers=1)))
    dom = domains.lookup(name)
    sources = disk_map(dom)
    for disk in result["disks"]:
        target = disk["target"]
        path = pathlib.Path(disk["path"])
        assert path == disk_dir / f"{name}-{target}-{point.set_id}.img" and disk["format"] == "raw"
        assert sources[target][:2] == (str(path), "raw")
        assert image_info(path)["format"] == "raw"
        assert path.stat().st_size == disk["virtual_size"]
        same, out = images_equal(str(path), str(point.refs[target]))
        assert same, out
        # Sparse: the file takes about its data, not its virtual size.
        data = allocated_data_bytes(str(point.refs[target]))
        allocated = path.stat().st_blocks * 512
        assert data <= allocated <= data + 2 * MIB, (target, data, allocated)
        assert allocated < disk["virtual_size"] // 4
    assert result["bytes_written"] == sum(pathlib.Path(d["path"]).stat().st_blocks * 512 for d in result["disks"])
    assert tree_state(chain.repo) == chain.tree


def test_as_of_picks_the_newest_set_completed_by_then(ansible, chain, disk_dir, domains):
    completed = [parse_time(p.manifest["completed"]) for p in chain.points]
    unused = domains.new_name()
    predicted = ansible("restore", chain.args(as_of=iso(completed[0]), disk_dir=disk_dir, restore_as=unused), check=True)
    assert predicted["set_id"] == chain.set_ids[0], predicted
    # By UUID (any case) instead of name: the same VM.
    by_uuid = {k: v for k, v in chain.args(as_of=iso(completed[2]), restore_as=unused).items() if k != "name"}
    by_uuid["uuid"] = chain.vm.uuid.upper()
    predicted = ansible("restore", by_uuid, check=True)
    assert predicted["set_id"] == chain.set_ids[2] and predicted["source_vm"]["uuid"] == chain.vm.uuid, predicted
    # Another zone, the same instant (and a moment later still picks that set).
    in_plus_one = (completed[1] + dt.timedelta(milliseconds=500)).astimezone(dt.timezone(dt.timedelta(hours=1)))
    name = domains.new_name()
    result = ansible("restore", chain.args(as_of=in_plus_one.isoformat(), restore_as=name, disk_dir=disk_dir))
    assert result["changed"] and result["set_id"] == chain.set_ids[1], result
    for disk in result["disks"]:
        assert images_equal(disk["path"], str(chain.points[1].refs[disk["target"]]))[0]
    written = listing(disk_dir)
    # A date alone is the end of that day: the newest set.
    day = completed[-1].date().isoformat()
    assert ansible("restore", chain.args(as_of=day, restore_as=unused), check=True)["set_id"] == chain.set_ids[-1]
    # Before the first set completed, there is no point.
    early = ansible("restore", chain.args(as_of=iso(completed[0] - dt.timedelta(seconds=1)), restore_as=unused,
                                          disk_dir=disk_dir))
    expect_error(early, "SET_NOT_FOUND")
    assert domains.lookup(unused) is None and listing(disk_dir) == written


def test_check_mode_reports_and_writes_nothing(ansible, chain, disk_dir, domains):
    name = domains.new_name()
    predicted = ansible("restore", chain.args(restore_as=name, disk_dir=disk_dir), check=True)
    expect_ok(predicted)
    assert predicted["set_id"] == chain.set_ids[-1]
    assert predicted["point"]["set_id"] == chain.set_ids[-1] and predicted["point"]["type"] == "incremental"
    assert predicted["chain"] == chain.set_ids
    assert [d["path"] for d in predicted["disks"]] == [str(disk_dir / f"{name}-{t}-{chain.set_ids[-1]}.qcow2") for t in TARGETS]
    xml = ET.fromstring(predicted["domain_xml"])
    assert xml.findtext("name") == name
    assert [d.find("source").get("file") for d in xml.findall("./devices/disk")] == [d["path"] for d in predicted["disks"]]
    assert predicted["bytes_read"] == 0 and predicted["estimated_bytes"] > 0
    assert domains.lookup(name) is None
    assert listing(disk_dir) == []
    assert tree_state(chain.repo) == chain.tree


# ----------------------------------------------------------------------------- refusals
def test_existing_domain_name_is_refused(ansible, conn, chain, restored_points, disk_dir):
    _dir, restored = restored_points
    # The running original, and a domain restored from another point.
    for name, set_id in ((chain.vm.name, chain.set_ids[-1]), (restored[0].name, chain.set_ids[1])):
        result = ansible("restore", chain.args(set_id=set_id, restore_as=name, disk_dir=disk_dir))
        expect_error(result, "TARGET_VM_EXISTS")
    assert listing(disk_dir) == []
    assert chain.vm.dom.isActive() and chain.vm.checkpoints() == chain.checkpoints
    assert marker(conn.lookupByName(restored[0].name))["set_id"] == chain.set_ids[0]


def test_existing_image_path_is_refused_and_kept(ansible, chain, disk_dir, domains):
    name = domains.new_name()
    set_id = chain.set_ids[-1]
    precious = disk_dir / f"{name}-vdb-{set_id}.qcow2"
    precious.write_bytes(b"not yours")
    result = ansible("restore", chain.args(restore_as=name, disk_dir=disk_dir))
    expect_error(result, "TARGET_PATH_EXISTS")
    assert result["existing_path"] == str(precious)
    assert precious.read_bytes() == b"not yours"
    assert listing(disk_dir) == [precious.name]
    assert domains.lookup(name) is None


def test_running_vm_is_never_replaced(ansible, chain, disk_dir):
    xml = ET.tostring(inactive_xml(chain.vm.dom))
    result = ansible("restore", chain.args(overwrite="replace", disk_dir=disk_dir))
    expect_error(result, "TARGET_VM_RUNNING")
    assert chain.vm.dom.isActive()
    assert ET.tostring(inactive_xml(chain.vm.dom)) == xml
    assert chain.vm.checkpoints() == chain.checkpoints
    assert listing(disk_dir) == []
    for target in TARGETS:
        assert images_equal(str(chain.vm.disks[target]), str(chain.points[-1].refs[target]))[0]


def test_exclusive_lock_holder_makes_restore_wait_then_fail(ansible, chain, disk_dir, domains):
    """The restore takes a shared lock: while an export (exclusive) holds it, nothing is written."""
    name = domains.new_name()
    with open(chain.repo / "vms" / chain.vm.uuid / "lock", "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        result = ansible("restore", chain.args(restore_as=name, disk_dir=disk_dir, lock_timeout=1))
    expect_error(result, "VM_LOCKED")
    assert domains.lookup(name) is None and listing(disk_dir) == []
    assert tree_state(chain.repo) == chain.tree


def test_storage_pool_and_a_name_that_is_not_path_safe(ansible, conn, chain, repo_root, domains):
    pool_dir = make_dir(repo_root / "pool")
    pool_name = f"{PREFIX}pool-{uuid.uuid4().hex[:8]}"
    pool = conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{pool_name}</name><target><path>{pool_dir}</path></target></pool>", 0)
    try:
        token = uuid.uuid4().hex[:6]
        name = f"{PREFIX}odd name 'q' $(touch x) é..-{token}"
        domains.names.append(name)
        result = expect_ok(ansible("restore", chain.args(set_id=chain.set_ids[0], restore_as=name, storage_pool=pool_name)))
        assert conn.lookupByName(name).name() == name
        stem = f"{PREFIX}odd_name__q____touch_x___..-{token}"
        expected = sorted(f"{stem}-{t}-{chain.set_ids[0]}.qcow2" for t in TARGETS)
        assert sorted(pathlib.Path(d["path"]).name for d in result["disks"]) == expected
        assert all(pathlib.Path(d["path"]).parent == pool_dir for d in result["disks"])
        assert listing(pool_dir) == expected
        # The pool was refreshed: libvirt knows the new volumes.
        assert sorted(pool.listVolumes()) == expected
        for disk in result["disks"]:
            assert images_equal(disk["path"], str(chain.points[0].refs[disk["target"]]))[0]
    finally:
        pool.destroy()  # transient: gone with its definition; the files go with repo_root


def _repo_copy(chain: ChainFixture, dest: pathlib.Path) -> pathlib.Path:
    """A copy of the shared repository to damage (modes kept: it is a repository like the original)."""
    shutil.copytree(chain.repo, dest, symlinks=True)
    return dest


@pytest.mark.parametrize("where", ["data", "header"])
def test_damaged_full_fails_with_checksum_mismatch_and_writes_nothing(ansible, chain, repo_root, disk_dir, domains, where):
    repo = _repo_copy(chain, repo_root / "damaged")
    full = repo / "vms" / chain.vm.uuid / "sets" / chain.set_ids[0] / "disks" / "vda.qcow2"
    flip_bit(full, full.stat().st_size // 2 if where == "data" else 0)
    before = tree_state(repo)
    name = domains.new_name()
    result = ansible("restore", dict(chain.args(set_id=chain.set_ids[2], restore_as=name, disk_dir=disk_dir),
                                     repository=str(repo)))
    expect_error(result, "CHECKSUM_MISMATCH")
    assert result["set_id"] == chain.set_ids[0] and result["file"] == "disks/vda.qcow2"
    # Every point reads the full's vda: all are affected.
    assert result["affected"] == chain.set_ids
    assert domains.lookup(name) is None
    assert listing(disk_dir) == [], "no image, no hidden .partial file, no journal"
    assert tree_state(repo) == before


def test_damage_outside_a_points_chain_does_not_block_it(ansible, chain, repo_root, disk_dir, domains):
    repo = _repo_copy(chain, repo_root / "damaged")
    # The raw vdc is whole in every set: point 3 does not read point 1's copy of it.
    vdc = repo / "vms" / chain.vm.uuid / "sets" / chain.set_ids[1] / "disks" / "vdc.qcow2"
    flip_bit(vdc, vdc.stat().st_size // 2)
    name = domains.new_name()
    good = ansible("restore", dict(chain.args(set_id=chain.set_ids[3], restore_as=name, disk_dir=disk_dir), repository=str(repo)))
    expect_ok(good)
    for disk in good["disks"]:
        assert images_equal(disk["path"], str(chain.points[3].refs[disk["target"]]))[0]
    bad_name = domains.new_name()
    bad = ansible("restore", dict(chain.args(set_id=chain.set_ids[1], restore_as=bad_name, disk_dir=disk_dir), repository=str(repo)))
    expect_error(bad, "CHECKSUM_MISMATCH")
    assert bad["affected"] == [chain.set_ids[1]]
    assert domains.lookup(bad_name) is None
    assert sorted(listing(disk_dir)) == sorted(pathlib.Path(d["path"]).name for d in good["disks"])


def test_missing_middle_incremental_is_chain_broken(ansible, chain, repo_root, disk_dir, domains):
    repo = _repo_copy(chain, repo_root / "broken")
    shutil.rmtree(repo / "vms" / chain.vm.uuid / "sets" / chain.set_ids[1])
    before = tree_state(repo)
    name = domains.new_name()
    result = ansible("restore", dict(chain.args(restore_as=name, disk_dir=disk_dir), repository=str(repo)))
    expect_error(result, "CHAIN_BROKEN")
    assert chain.set_ids[1] in result["msg"]
    assert set(result["affected"]) >= {chain.set_ids[2], chain.set_ids[3]}
    assert domains.lookup(name) is None
    assert listing(disk_dir) == []
    assert tree_state(repo) == before


# ----------------------------------------------------------------------------- identity, networks, replace
def test_shut_off_copy_new_identity_then_replace(ansible, conn, domain_type, repo, repo_root, disk_dir, domains):
    src = make_dir(repo_root / "src")
    vda, vdb, ro = src / "vda.qcow2", src / "vdb.qcow2", src / "ro.img"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(vda), "64M"])
    qemu_io_write(vda, "qcow2", 0x5A, "0", "3M")
    qemu_io_write(vda, "qcow2", 0x5B, "50M", "1M")
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(vdb), "16M"])
    run(["qemu-img", "create", "-q", "-f", "raw", str(ro), "1M"])
    name = domains.new_name("net")
    vm_uuid = str(uuid.uuid4())
    original_macs = ["52:54:00:3a:11:01", "52:54:00:3a:11:02"]
    devices = (
        file_disk(vda, "vda") + file_disk(vdb, "vdb") + file_disk(ro, "vdc", "raw", "<readonly/>")
        + file_disk(src / "gone.iso", "hdc", "raw", "<readonly/>", device="cdrom")
        + f"<interface type='network'><mac address='{original_macs[0]}'/><source network='netA'/><model type='virtio'/></interface>"
        + f"<interface type='bridge'><mac address='{original_macs[1]}'/><source bridge='brA'/><model type='virtio'/></interface>"
    )
    head = f"<uuid>{vm_uuid}</uuid><sysinfo type='smbios'><system><entry name='uuid'>{vm_uuid}</entry></system></sysinfo>"
    original = define_domain(conn, domain_type, name, devices, os_extra="<smbios mode='sysinfo'/>", head=head)
    export = ansible("export", {"name": name, "repository": str(repo), "exclude_disks": ["vdb"]})
    assert export["changed"] and export["type"] == "copy", export
    set_id = export["set_id"]
    tree = tree_state(repo)

    copy_name = domains.new_name()
    args = {"repository": str(repo), "name": name, "restore_as": copy_name, "disk_dir": str(disk_dir),
            "network_map": {"netA": "netB", "brA": "brB"}}
    # netB does not exist: the copy cannot start, and the restore undoes itself.
    failed = expect_error(ansible("restore", dict(args, start=True)), "RESTORE_FAILED")
    assert "start" in failed["msg"]
    assert domains.lookup(copy_name) is None and listing(disk_dir) == []
    result = ansible("restore", args)
    expect_ok(result)
    assert result["point"]["type"] == "copy" and result["chain"] == [set_id]
    assert result["dropped_disks"] == ["vdb"]
    dom = conn.lookupByName(copy_name)
    assert dom.UUIDString() not in (vm_uuid, None)
    root = inactive_xml(dom)
    assert root.findtext("./sysinfo/system/entry[@name='uuid']") == dom.UUIDString()
    restored_macs = macs(dom)
    assert len(restored_macs) == 2 and not set(restored_macs) & set(original_macs)
    assert root.find("./devices/interface[@type='network']/source").get("network") == "netB"
    assert root.find("./devices/interface[@type='bridge']/source").get("bridge") == "brB"
    disks = disk_map(dom)
    restored_vda = str(disk_dir / f"{copy_name}-vda-{set_id}.qcow2")
    assert disks == {
        "vda": (restored_vda, "qcow2", "disk"),
        "vdc": (str(ro), "raw", "disk"),  # read-only: shared, not dropped
        "hdc": (None, "raw", "cdrom"),  # its image does not exist here: left empty
    }
    assert images_equal(restored_vda, str(vda), force_share=False)[0]
    assert dom.listAllCheckpoints() == [] and marker(dom)["set_id"] == set_id
    # The original is as it was.
    assert macs(original) == original_macs and original.UUIDString() == vm_uuid
    assert disk_map(original)["vda"][0] == str(vda)

    # Replace the original itself: same UUID and MACs, a writable disk that was not backed up stays.
    qemu_io_write(vda, "qcow2", 0x77, "0", "1M")
    replaced = ansible("restore", {"repository": str(repo), "name": name, "overwrite": "replace", "disk_dir": str(disk_dir)})
    assert replaced["changed"] and replaced["vm"] == {"name": name, "uuid": vm_uuid, "state": "shutoff", "replaced": True}, replaced
    dom = conn.lookupByName(name)
    assert dom.UUIDString() == vm_uuid and macs(dom) == original_macs
    disks = disk_map(dom)
    new_vda = str(disk_dir / f"{name}-vda-{set_id}.qcow2")
    assert disks["vda"][0] == new_vda and disks["vdb"][0] == str(vdb)
    assert replaced["replaced_disks"] == [str(vda)] and replaced["removed_disks"] == [str(vda)]
    assert not vda.exists() and vdb.exists()
    assert images_equal(new_vda, restored_vda, force_share=False)[0]
    assert inactive_xml(dom).find("./devices/interface[@type='network']/source").get("network") == "netA"
    assert tree_state(repo) == tree


def test_replace_resets_a_shut_off_vm_to_the_backup(ansible, conn, vms, repo, disk_dir, scratch):
    vm = vms.create([DiskSpec("64M", fill=[(0x41, "0", "4M")])])
    full = ansible("export", {"name": vm.name, "repository": str(repo)})
    assert full["type"] == "full", full
    ref = vm.snapshot_disk("vda", scratch / "ref.qcow2")
    vm.dom.destroy()
    assert vm.checkpoints() == [full["checkpoint"]]
    old = vm.disks["vda"]
    qemu_io_write(old, "qcow2", 0x99, "0", "1M")
    assert not images_equal(str(old), str(ref), force_share=False)[0]
    tree = tree_state(repo)
    checkpoint_xml = vm.dom.checkpointLookupByName(full["checkpoint"]).getXMLDesc(0)
    xml = ET.tostring(inactive_xml(vm.dom))

    # QEMU cannot reach images in a private directory: the start fails and the replace is undone,
    # the old definition, disks and checkpoints back as they were.
    private = scratch / "private"
    private.mkdir(mode=0o700)
    args = {"repository": str(repo), "name": vm.name, "set_id": full["set_id"], "overwrite": "replace", "disk_dir": str(private)}
    failed = expect_error(ansible("restore", dict(args, start=True)), "RESTORE_FAILED")
    assert "start" in failed["msg"]
    assert not vm.dom.isActive() and ET.tostring(inactive_xml(vm.dom)) == xml
    assert vm.checkpoints() == [full["checkpoint"]]
    assert vm.dom.checkpointLookupByName(full["checkpoint"]).getXMLDesc(0) == checkpoint_xml
    assert old.exists() and not images_equal(str(old), str(ref), force_share=False)[0]
    assert listing(private) == []

    args["disk_dir"] = str(disk_dir)
    result = ansible("restore", args)
    expect_ok(result)
    first = disk_dir / f"{vm.name}-vda-{full['set_id']}.qcow2"
    dom = conn.lookupByUUIDString(vm.uuid)
    assert dom.name() == vm.name and not dom.isActive()
    assert disk_map(dom)["vda"][:2] == (str(first), "qcow2")
    assert images_equal(str(first), str(ref), force_share=False)[0]
    assert result["replaced_disks"] == [str(old)] and result["removed_disks"] == [str(old)]
    assert not old.exists()
    assert dom.listAllCheckpoints() == [], "the old checkpoints' bitmaps are in the replaced disk"
    assert marker(dom)["set_id"] == full["set_id"]

    # Again, keeping the replaced disk: the new image cannot take the name the VM uses now.
    qemu_io_write(first, "qcow2", 0x98, "2M", "1M")
    kept = ansible("restore", dict(args, keep_replaced_disks=True))
    assert kept["changed"], kept
    second = disk_dir / f"{vm.name}-vda-{full['set_id']}-2.qcow2"
    assert disk_map(dom)["vda"][0] == str(second)
    assert kept["replaced_disks"] == [str(first)] and kept["removed_disks"] == []
    assert first.exists()
    assert images_equal(str(second), str(ref), force_share=False)[0]
    assert tree_state(repo) == tree


# ----------------------------------------------------------------------------- interruption
@pytest.mark.slow
def test_killed_restore_is_cleaned_up_by_the_next(ansible, vms, repo, disk_dir, domains):
    vm = vms.create([DiskSpec("1G", fill=[(0xD1, "0", "768M")])], running=False)
    export = ansible("export", {"name": vm.name, "repository": str(repo)})
    assert export["type"] == "copy", export
    tree, xml = tree_state(repo), ET.tostring(inactive_xml(vm.dom))
    disk_stat = vm.disks["vda"].stat()
    name = domains.new_name()
    args = {"repository": str(repo), "name": vm.name, "restore_as": name, "disk_dir": str(disk_dir)}

    proc = ansible.popen("restore", args)
    wait_for(lambda: any(".partial-" in n for n in listing(disk_dir)), timeout=120, what="a .partial image")
    kill_tree(proc)
    left = listing(disk_dir)
    assert any(".partial-" in n for n in left) and any(n.startswith(".vmbackup-restore-") for n in left), left
    assert domains.lookup(name) is None
    assert tree_state(repo) == tree
    assert ET.tostring(inactive_xml(vm.dom)) == xml and not vm.dom.isActive() and vm.checkpoints() == []
    assert (vm.disks["vda"].stat().st_mtime_ns, vm.disks["vda"].stat().st_size) == (disk_stat.st_mtime_ns, disk_stat.st_size)

    result = ansible("restore", args)
    expect_ok(result)
    assert result["cleaned_up"] and all("interrupted restore" in c for c in result["cleaned_up"]), result["cleaned_up"]
    assert any(".partial-" in c for c in result["cleaned_up"])
    assert listing(disk_dir) == [f"{name}-vda-{export['set_id']}.qcow2"]
    assert images_equal(result["disks"][0]["path"], str(vm.disks["vda"]), force_share=False)[0]
    assert tree_state(repo) == tree


# ----------------------------------------------------------------------------- firmware state
def test_nvram_is_restored_private_and_equal(ansible, conn, domain_type, repo, repo_root, disk_dir, domains):
    src = make_dir(repo_root / "src")
    vda = src / "vda.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(vda), "16M"])
    qemu_io_write(vda, "qcow2", 0x61, "0", "1M")
    name = domains.new_name("uefi")
    nvram = NVRAM_DIR / f"{name}_VARS.fd"
    domains.files.append(nvram)
    nvram.write_bytes(os.urandom(128 * 1024))
    os.chmod(nvram, 0o600)
    os_extra = f"<loader readonly='yes' type='pflash'>{LOADER}</loader><nvram>{nvram}</nvram>"
    define_domain(conn, domain_type, name, file_disk(vda, "vda"), os_extra=os_extra)
    export = ansible("export", {"name": name, "repository": str(repo)})
    assert export["changed"], export
    set_dir = repo / "vms" / conn.lookupByName(name).UUIDString() / "sets" / export["set_id"]
    assert sha256(set_dir / "nvram.fd") == sha256(nvram)

    copy_name = domains.new_name()
    restored_nvram = NVRAM_DIR / f"{copy_name}-{export['set_id']}_VARS.fd"
    domains.files.append(restored_nvram)
    result = ansible("restore", {"repository": str(repo), "name": name, "restore_as": copy_name, "disk_dir": str(disk_dir)})
    expect_ok(result)
    assert result["nvram"] == str(restored_nvram)
    assert restored_nvram.stat().st_mode & 0o777 == 0o600
    assert sha256(restored_nvram) == sha256(nvram)
    assert inactive_xml(conn.lookupByName(copy_name)).findtext("./os/nvram") == str(restored_nvram)
    assert not [n for n in listing(NVRAM_DIR) if ".partial-" in n]

    # Replacing the VM resets it to the point every time, firmware state included; the replaced
    # VM's NVRAM file goes with its old disks.
    previous = nvram
    for attempt in range(3):
        previous.write_bytes(os.urandom(128 * 1024))  # the firmware wrote since
        replaced = ansible("restore", {"repository": str(repo), "name": name, "overwrite": "replace", "disk_dir": str(disk_dir)})
        assert not replaced["failed"], (attempt, replaced["msg"])
        new = pathlib.Path(replaced["nvram"])
        domains.files.append(new)
        assert new != previous and new.parent == NVRAM_DIR
        assert inactive_xml(conn.lookupByName(name)).findtext("./os/nvram") == str(new)
        assert sha256(new) == sha256(set_dir / "nvram.fd") and new.stat().st_mode & 0o777 == 0o600
        assert str(previous) in replaced["removed_disks"] and not previous.exists()
        previous = new
