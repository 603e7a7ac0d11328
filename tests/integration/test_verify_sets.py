"""vmbackup.libvirt.verify against real repositories written by export, damaged by hand.

One repository is built per module (a running VM with two qcow2 disks: full, i1, i2, i3, and a
shut-off VM with one copy set) and never touched; every test damages its own `cp -a` copy and
verifies that (the cases of the `damage` registry are verified side by side by one fixture).
Expectations (sizes, points that read a file, chains) are computed here from the files on disk
and the JSON of the manifests, never with the collection's code.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
import stat
import struct
import subprocess
import time
import typing as t
import uuid

import pytest

from harness import MIB, DiskSpec, Pending, Vm, VmFactory, run, sha256, tree_state

REPO_BASE = pathlib.Path("/var/tmp/vmbackup-tests")
CHAIN = ("full", "i1", "i2", "i3")
SIDECAR_SUFFIX = ".verify.json"


# ----------------------------------------------------------------------------- the repository
@dataclasses.dataclass
class Built:
    repo: pathlib.Path
    vm: Vm
    other: Vm
    ids: dict[str, str]  # label (full, i1, i2, i3, other) -> set id

    def uuid_of(self, label: str) -> str:
        return self.other.uuid if label == "other" else self.vm.uuid


@pytest.fixture(scope="module")
def built(ansible, conn, domain_type):
    """The pristine repository, built once; tests never touch it, only copies of it."""
    factory = VmFactory(conn, domain_type)
    REPO_BASE.mkdir(mode=0o711, exist_ok=True)
    root = REPO_BASE / f"verify-{uuid.uuid4().hex[:10]}"
    root.mkdir(mode=0o711)
    os.chmod(root, 0o711)
    try:
        vm = factory.create([DiskSpec("128M", fill=[(0xA1, "0", "8M"), (0xA2, "100M", "2M")]),
                             DiskSpec("64M", fill=[(0xB1, "1M", "3M")])])
        other = factory.create([DiskSpec("16M", fill=[(0xC1, "0", "1M")])], running=False)
        repo = root / "repo"
        args = {"name": vm.name, "repository": str(repo), "create_repository": True}
        results = [ansible("export", args)]
        for i, pattern in enumerate((0x11, 0x22, 0x33)):
            vm.write("vda", pattern, f"{12 + 4 * i}M", "1M")
            vm.write("vdb", pattern + 1, f"{20 + 4 * i}M", "512K")
            results.append(ansible("export", args))
        assert [r.get("type") for r in results] == ["full", "incremental", "incremental", "incremental"], results
        # Set ids are unique per VM only; the tests name sets by id, so the other VM's set must
        # not share i3's second.
        while time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) <= results[-1]["set_id"][:16]:
            time.sleep(0.05)
        copy = ansible("export", {"name": other.name, "repository": str(repo)})
        assert copy.get("type") == "copy", copy
        ids = dict(zip(CHAIN, (r["set_id"] for r in results)))
        ids["other"] = copy["set_id"]
        yield Built(repo, vm, other, ids)
    finally:
        factory.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@dataclasses.dataclass
class Copy:
    """A test's own copy of the built repository, with ways to damage it."""

    path: pathlib.Path
    built: Built

    @property
    def labels(self) -> dict[str, str]:
        return {sid: label for label, sid in self.built.ids.items()}

    def sets_dir(self, label: str) -> pathlib.Path:
        return self.path / "vms" / self.built.uuid_of(label) / "sets"

    def set_dir(self, label: str) -> pathlib.Path:
        return self.sets_dir(label) / self.built.ids[label]

    def file(self, label: str, rel: str) -> pathlib.Path:
        return self.set_dir(label) / rel

    def sidecar(self, label: str) -> pathlib.Path:
        return self.sets_dir(label) / f"{self.built.ids[label]}{SIDECAR_SUFFIX}"

    def manifest(self, label: str) -> dict[str, t.Any]:
        return json.loads(self.file(label, "manifest.json").read_text())

    def rewrite_manifest(self, label: str, edit: t.Callable[[dict[str, t.Any]], None]) -> None:
        data = self.manifest(label)
        edit(data)
        write_bytes(self.file(label, "manifest.json"), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    def state(self) -> dict[str, tuple]:
        """Everything but the verdict files."""
        return {k: v for k, v in tree_state(self.path).items() if not k.endswith(SIDECAR_SUFFIX)}

    def sidecars(self) -> list[str]:
        return sorted(str(p) for p in self.path.rglob(f"*{SIDECAR_SUFFIX}"))


@pytest.fixture
def copy(built, repo) -> Copy:
    subprocess.run(["cp", "-a", f"{built.repo}/.", str(repo)], check=True)  # into the (empty) repo fixture
    return Copy(repo, built)


# ----------------------------------------------------------------------------- damage
def _writable(path: pathlib.Path):
    mode = stat.S_IMODE(path.stat().st_mode)
    os.chmod(path, mode | stat.S_IWUSR)
    return mode


def write_bytes(path: pathlib.Path, data: bytes) -> None:
    mode = _writable(path)
    with open(path, "r+b") as fh:
        fh.write(data)
        fh.truncate()
    os.chmod(path, mode)


def flip(path: pathlib.Path, offset: int, bit: int = 0x10) -> None:
    """Flip one bit in place (offset < 0 counts from the end); size and mode stay."""
    mode = _writable(path)
    with open(path, "r+b") as fh:
        fh.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        where = fh.tell()
        byte = fh.read(1)
        assert len(byte) == 1
        fh.seek(where)
        fh.write(bytes([byte[0] ^ bit]))
    os.chmod(path, mode)


def truncate(path: pathlib.Path, size: int) -> None:
    mode = _writable(path)
    os.truncate(path, size)
    os.chmod(path, mode)


def host_offset(image: pathlib.Path, guest_offset: int) -> int:
    """Where in the qcow2 file the guest byte lives (qemu-img map), so a flip hits guest data."""
    for extent in json.loads(run(["qemu-img", "map", "--output=json", str(image)]).stdout):
        if extent.get("data") and extent["start"] <= guest_offset < extent["start"] + extent["length"]:
            return extent["offset"] + guest_offset - extent["start"]
    raise AssertionError(f"guest offset {guest_offset} holds no data in {image}")


def image_check_rc(image: pathlib.Path) -> int:
    return run(["qemu-img", "check", "-f", "qcow2", str(image)], check=False).returncode


def reference_a_cluster_twice(image: pathlib.Path, guest_offset: int) -> None:
    """Make two guest clusters share one host cluster (refcount 1, two references): a qcow2
    corruption that qemu-img check reports, written by parsing the header here."""
    mode = _writable(image)
    with open(image, "r+b") as fh:
        header = fh.read(104)
        cluster_size = 1 << struct.unpack(">I", header[20:24])[0]
        l1_offset = struct.unpack(">Q", header[40:48])[0]
        l2_entries = cluster_size // 8
        index = guest_offset // cluster_size
        fh.seek(l1_offset + 8 * (index // l2_entries))
        l2_offset = struct.unpack(">Q", fh.read(8))[0] & 0x00FFFFFFFFFFFE00
        assert l2_offset, "no L2 table for that offset"
        fh.seek(l2_offset + 8 * (index % l2_entries))
        entry = fh.read(8)
        assert struct.unpack(">Q", entry)[0] & 0x00FFFFFFFFFFFE00, "the cluster is not allocated"
        fh.write(entry)  # the next guest cluster now points at the same host cluster
    os.chmod(image, mode)


# ----------------------------------------------------------------------------- independent expectations
def file_sizes(set_dir: pathlib.Path) -> int:
    """Bytes of every file of a set but its manifest, from the file system."""
    return sum(p.stat().st_size for p in set_dir.rglob("*") if p.is_file() and p.name != "manifest.json")


def chain_read_bytes(cp: Copy, label: str) -> int:
    """Bytes a restore of point ``label`` reads: for each disk, its file in every set back to the
    set where that disk is stored whole (parent links followed in the manifests' JSON)."""
    total = 0
    for disk in cp.manifest(label)["disks"]:
        current = label
        while True:
            manifest = cp.manifest(current)
            entry = next(d for d in manifest["disks"] if d["target"] == disk["target"])
            total += cp.file(current, entry["file"]).stat().st_size
            if entry["method"] != "incremental":
                break
            current = cp.labels[manifest["parent"]["set_id"]]
    return total


def verdicts(cp: Copy, result: dict[str, t.Any]) -> dict[str, tuple[str, list[str]]]:
    return {cp.labels[s["set_id"]]: (s["outcome"], s["codes"]) for s in result["sets"]}


def expect(labels: t.Iterable[str] = (*CHAIN, "other"), **failed: list[str]) -> dict[str, tuple[str, list[str]]]:
    """Verdicts: the named sets failed with these codes, every other set ok."""
    out = {label: ("ok", []) for label in labels}
    out.update({label: ("failed", codes) for label, codes in failed.items()})
    return out


def findings(cp: Copy, result: dict[str, t.Any]) -> list[tuple]:
    """(code, set, file, affected points, parent) per finding, with set labels for set ids."""
    return [
        (f["code"], cp.labels[f["set_id"]], f["file"], [cp.labels[a] for a in f["affected"]],
         cp.labels.get(f.get("parent"), f.get("parent")))
        for f in result["findings"]
    ]


def _start(ansible, cp: Copy, check: bool, args: dict[str, t.Any]) -> Pending:
    argv = ansible.argv("verify", {"repository": str(cp.path), **args}, check)
    return Pending(subprocess.Popen(argv, env=ansible.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


def _check_sidecars(cp: Copy, result: dict[str, t.Any], recorded: bool) -> None:
    """Each checked set's verdict sits beside it (0600) and agrees with the result."""
    if not recorded:
        return
    for res in result.get("sets", []):
        label = cp.labels[res["set_id"]]
        path = cp.sidecar(label)
        assert str(path) in result["sidecars"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        sidecar = json.loads(path.read_text())
        assert (sidecar["set_id"], sidecar["outcome"], sidecar["codes"]) == (res["set_id"], res["outcome"], res["codes"])
        assert sidecar["manifest_sha256"] == sha256(cp.file(label, "manifest.json"))


def verify(ansible, cp: Copy, check: bool = False, **args: t.Any) -> dict[str, t.Any]:
    """Run verify on the copy; the committed sets must come out byte-identical, verdicts sit beside them."""
    before = cp.state()
    result = _start(ansible, cp, check, args).result(timeout=300)
    assert cp.state() == before, "verify changed a committed set"
    _check_sidecars(cp, result, recorded=not check and args.get("record", True))
    return result


def verify_side_by_side(ansible, cp: Copy, runs: list[tuple[bool, dict[str, t.Any]]]) -> list[dict[str, t.Any]]:
    """Several runs that record nothing (check mode, record=false, refused arguments) at once:
    verifies share the VM's lock, and the machine has idle cores while Ansible starts up."""
    before = tree_state(cp.path)
    pending = [_start(ansible, cp, check, args) for check, args in runs]
    results = [p.result(timeout=300) for p in pending]
    assert tree_state(cp.path) == before, "a run that records nothing changed the repository"
    for (check, args), result in zip(runs, results):
        # Check mode predicts the verdicts a real run would record; record=false records none.
        predicted = check and args.get("record", True) and bool(result.get("sets"))
        assert result.get("sidecars", []) == [] and bool(result.get("changed")) == predicted, result
    return results


def _by_place(finding: dict[str, t.Any]) -> tuple:
    return finding["set_id"], finding["code"], finding["file"] or ""


def assert_failed(result: dict[str, t.Any], code: str) -> None:
    assert result["failed"] and result["outcome"] == "failed", result
    assert result["error_code"] == code, result
    assert result["failed_sets"] == [s["set_id"] for s in result["sets"] if s["outcome"] == "failed"]
    assert result["sets_failed"] == len(result["failed_sets"])
    assert result["sets_ok"] + result["sets_failed"] == result["sets_checked"] == len(result["sets"])
    assert code in result["msg"]
    # Each finding is listed once; a set refers to exactly the findings whose affected points include it.
    keys = [(f["vm_uuid"], f["set_id"], f["code"], f["file"], f["msg"]) for f in result["findings"]]
    assert len(keys) == len(set(keys)), result["findings"]
    for res in result["sets"]:
        assert "findings" not in res
        mine = [i for i, f in enumerate(result["findings"]) if res["set_id"] in f["affected"]]
        assert res["finding_refs"] == mine


# ----------------------------------------------------------------------------- a sound repository
def test_sound_repository_passes_and_records_verdicts_beside_the_sets(ansible, copy):
    cp = copy
    everything = tree_state(cp.path)

    predicted, unrecorded = verify_side_by_side(ansible, cp, [(True, {}), (False, {"record": False})])
    assert predicted["changed"] and not unrecorded["changed"], (predicted, unrecorded)
    for quiet in (predicted, unrecorded):
        assert not quiet["failed"], quiet
        assert quiet["outcome"] == "ok" and verdicts(cp, quiet) == expect()
    assert tree_state(cp.path) == everything

    result = verify(ansible, cp)
    assert not result["failed"] and result["changed"] and result["outcome"] == "ok", result
    assert "error_code" not in result and result["findings"] == []
    assert verdicts(cp, result) == expect()
    assert [cp.labels[s["set_id"]] for s in result["sets"] if s["vm_uuid"] == cp.built.vm.uuid] == list(CHAIN)
    assert {s["type"] for s in result["sets"]} == {"full", "incremental", "copy"}
    assert (result["sets_checked"], result["sets_ok"], result["sets_failed"], result["failed_sets"]) == (5, 5, 0, [])
    all_labels = (*CHAIN, "other")
    assert result["bytes_read"] == sum(file_sizes(cp.set_dir(label)) for label in all_labels)
    for res in result["sets"]:
        label = cp.labels[res["set_id"]]
        assert res["bytes_read"] == file_sizes(cp.set_dir(label))
        assert res["files_checked"] == len(cp.manifest(label)["files"])
    assert sorted(result["sidecars"]) == sorted(str(cp.sidecar(label)) for label in all_labels) == cp.sidecars()
    for label in all_labels:
        sidecar = json.loads(cp.sidecar(label).read_text())
        assert (sidecar["outcome"], sidecar["level"], sidecar["findings"]) == ("ok", "data", [])
        # A verdict is never written into the committed set.
        assert not list(cp.set_dir(label).rglob(f"*{SIDECAR_SUFFIX}"))

    restore = verify(ansible, cp, level="restore")
    assert not restore["failed"] and restore["outcome"] == "ok" and restore["level"] == "restore", restore
    assert verdicts(cp, restore) == expect()
    assert restore["bytes_read"] == result["bytes_read"] + sum(chain_read_bytes(cp, label) for label in all_labels)
    assert json.loads(cp.sidecar("i3").read_text())["level"] == "restore"


# ----------------------------------------------------------------------------- damaged copies
# Each case below damages its own copy of the repository in one way. The `damaged` fixture makes
# every copy, then verifies them all, a few at a time (most of a run is Ansible starting up);
# each test reads its case's result.
DAMAGE: dict[str, tuple[t.Callable[[Copy], None], dict[str, t.Any]]] = {}


def damage(name: str, **args: t.Any):
    """Register a way to damage a copy, and the verify arguments for it (a callable value is
    given the built repository, for set ids)."""
    def register(make: t.Callable[[Copy], None]) -> t.Callable[[Copy], None]:
        DAMAGE[name] = (make, args)
        return make
    return register


@pytest.fixture(scope="module")
def damaged(ansible, built):
    root = REPO_BASE / f"verify-damaged-{uuid.uuid4().hex[:10]}"
    root.mkdir(mode=0o711)
    os.chmod(root, 0o711)
    try:
        cases = {}
        for name, (make, args) in DAMAGE.items():
            cp = Copy(root / name, built)
            subprocess.run(["cp", "-a", str(built.repo), str(cp.path)], check=True)
            make(cp)
            args = {key: value(built) if callable(value) else value for key, value in args.items()}
            cases[name] = (cp, args, cp.state())
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            runs = {name: pool.submit(lambda c: _start(ansible, c[0], False, c[1]).result(timeout=300), case)
                    for name, case in cases.items()}
            results = {name: run.result() for name, run in runs.items()}

        def verified(name: str) -> tuple[Copy, dict[str, t.Any]]:
            cp, args, before = cases[name]
            assert cp.state() == before, "verify changed a committed set"
            _check_sidecars(cp, results[name], recorded=args.get("record", True))
            return cp, results[name]

        yield verified
    finally:
        shutil.rmtree(root, ignore_errors=True)


@damage("full-data")
def _flip_in_the_full_data(cp: Copy) -> None:
    image = cp.file("full", "disks/vda.qcow2")
    flip(image, host_offset(image, 4 * MIB))
    # qemu-img check cannot see a flipped data bit; only the checksum can.
    assert image_check_rc(image) == 0


def test_bit_flip_in_the_full_disk_data_affects_every_point_of_the_chain(damaged):
    cp, result = damaged("full-data")
    assert_failed(result, "CHECKSUM_MISMATCH")
    assert findings(cp, result) == [("CHECKSUM_MISMATCH", "full", "disks/vda.qcow2", list(CHAIN), None)]
    assert verdicts(cp, result) == expect(**{label: ["CHECKSUM_MISMATCH"] for label in CHAIN})
    assert result["failed_sets"] == [cp.built.ids[label] for label in CHAIN]
    assert cp.built.ids["full"] in result["msg"] and "disks/vda.qcow2" in result["msg"]


@damage("incremental-data")
def _flip_in_an_incremental(cp: Copy) -> None:
    image = cp.file("i2", "disks/vda.qcow2")
    flip(image, host_offset(image, 16 * MIB))


def test_bit_flip_in_an_incremental_affects_it_and_later_points_only(damaged):
    cp, result = damaged("incremental-data")
    assert_failed(result, "CHECKSUM_MISMATCH")
    assert findings(cp, result) == [("CHECKSUM_MISMATCH", "i2", "disks/vda.qcow2", ["i2", "i3"], None)]
    assert verdicts(cp, result) == expect(i2=["CHECKSUM_MISMATCH"], i3=["CHECKSUM_MISMATCH"])


@damage("second-disk-and-domain-xml")
def _flip_in_vdb_and_domain_xml(cp: Copy) -> None:
    image = cp.file("full", "disks/vdb.qcow2")
    flip(image, host_offset(image, 2 * MIB))
    flip(cp.file("i2", "domain.xml"), 40)


def test_flip_in_the_second_disk_and_in_a_domain_xml(damaged):
    cp, result = damaged("second-disk-and-domain-xml")
    assert_failed(result, "CHECKSUM_MISMATCH")
    assert findings(cp, result) == [
        ("CHECKSUM_MISMATCH", "full", "disks/vdb.qcow2", list(CHAIN), None),
        ("CHECKSUM_MISMATCH", "i2", "domain.xml", ["i2"], None),
    ]
    assert verdicts(cp, result) == expect(**{label: ["CHECKSUM_MISMATCH"] for label in CHAIN})
    by_set = {cp.labels[s["set_id"]]: sorted(result["findings"][i]["file"] for i in s["finding_refs"]) for s in result["sets"]}
    assert by_set["i2"] == ["disks/vdb.qcow2", "domain.xml"]
    assert by_set["i3"] == ["disks/vdb.qcow2"]


@damage("last-and-header-byte")
def _flip_last_and_header_bytes(cp: Copy) -> None:
    flip(cp.file("i3", "disks/vda.qcow2"), -1, bit=0x01)
    flip(cp.file("i3", "disks/vdb.qcow2"), 3, bit=0x01)  # the last byte of the qcow2 magic


def test_flip_of_the_last_byte_or_of_a_header_byte_is_a_checksum_mismatch(damaged):
    cp, result = damaged("last-and-header-byte")
    assert_failed(result, "CHECKSUM_MISMATCH")
    assert findings(cp, result) == [
        ("CHECKSUM_MISMATCH", "i3", "disks/vda.qcow2", ["i3"], None),
        ("CHECKSUM_MISMATCH", "i3", "disks/vdb.qcow2", ["i3"], None),
    ]
    assert verdicts(cp, result) == expect(i3=["CHECKSUM_MISMATCH"])


@damage("truncated")
def _truncate(cp: Copy) -> None:
    image = cp.file("i1", "disks/vda.qcow2")
    truncate(image, image.stat().st_size // 2)


def test_truncated_file_is_a_size_mismatch(damaged):
    cp, result = damaged("truncated")
    assert_failed(result, "SIZE_MISMATCH")
    assert findings(cp, result) == [("SIZE_MISMATCH", "i1", "disks/vda.qcow2", ["i1", "i2", "i3"], None)]
    assert verdicts(cp, result) == expect(i1=["SIZE_MISMATCH"], i2=["SIZE_MISMATCH"], i3=["SIZE_MISMATCH"])


@damage("missing")
def _delete_files(cp: Copy) -> None:
    cp.file("i1", "disks/vdb.qcow2").unlink()
    cp.file("full", "checkpoint.xml").unlink()
    # A link to a file with the right content is not the file: it is never followed.
    domain_xml = cp.file("full", "domain.xml")
    shutil.copy2(domain_xml, cp.path / "domain.xml")
    domain_xml.unlink()
    domain_xml.symlink_to(cp.path / "domain.xml")


def test_missing_file_is_file_missing(damaged):
    cp, result = damaged("missing")
    assert_failed(result, "FILE_MISSING")
    assert findings(cp, result) == [
        ("FILE_MISSING", "full", "checkpoint.xml", ["full"], None),
        ("FILE_MISSING", "full", "domain.xml", ["full"], None),
        ("FILE_MISSING", "i1", "disks/vdb.qcow2", ["i1", "i2", "i3"], None),
    ]
    assert verdicts(cp, result) == expect(full=["FILE_MISSING"], i1=["FILE_MISSING"], i2=["FILE_MISSING"], i3=["FILE_MISSING"])


@damage("reported", fail_on_error=False)
def _delete_a_disk_file(cp: Copy) -> None:
    cp.file("i2", "disks/vdb.qcow2").unlink()


def test_fail_on_error_false_reports_without_failing(damaged):
    cp, result = damaged("reported")
    assert not result["failed"] and result["changed"] and result["outcome"] == "failed", result
    assert "error_code" not in result
    assert findings(cp, result) == [("FILE_MISSING", "i2", "disks/vdb.qcow2", ["i2", "i3"], None)]
    assert verdicts(cp, result) == expect(i2=["FILE_MISSING"], i3=["FILE_MISSING"])
    assert json.loads(cp.sidecar("i3").read_text())["outcome"] == "failed"
    assert json.loads(cp.sidecar("i1").read_text())["outcome"] == "ok"


@damage("image-invalid")
def _corrupt_image_and_record_its_checksum(cp: Copy) -> None:
    image = cp.file("i3", "disks/vda.qcow2")
    reference_a_cluster_twice(image, 20 * MIB)
    assert image_check_rc(image) == 2

    def record_new_checksum(m):
        m["files"]["disks/vda.qcow2"]["sha256"] = sha256(image)

    cp.rewrite_manifest("i3", record_new_checksum)  # i3 is the newest: no child recorded its hash


def test_corrupt_image_with_matching_checksum_is_image_invalid(damaged):
    cp, result = damaged("image-invalid")
    assert_failed(result, "IMAGE_INVALID")
    assert findings(cp, result) == [("IMAGE_INVALID", "i3", "disks/vda.qcow2", ["i3"], None)]
    assert verdicts(cp, result) == expect(i3=["IMAGE_INVALID"])


def _shrink_the_copy_set(cp: Copy) -> None:
    """The copy set's image is larger than its manifest says: sound files, but the point does not
    read into a disk of the recorded size (a copy set has no child whose link would break)."""

    def shrink(m):
        m["disks"][0]["virtual_size"] = 8 * MIB

    cp.rewrite_manifest("other", shrink)


damage("shrunk-data", record=False)(_shrink_the_copy_set)
damage("shrunk-restore", record=False, level="restore")(_shrink_the_copy_set)


def test_only_level_restore_reads_points_through_their_chains(damaged):
    cp, data = damaged("shrunk-data")
    assert not data["failed"] and verdicts(cp, data) == expect(), data
    cp, restore = damaged("shrunk-restore")
    assert_failed(restore, "IMAGE_INVALID")
    assert findings(cp, restore) == [("IMAGE_INVALID", "other", "disks/vda.qcow2", ["other"], None)]
    assert verdicts(cp, restore) == expect(other=["IMAGE_INVALID"])


def _two_faults(cp: Copy) -> None:
    flip(cp.file("i1", "disks/vdb.qcow2"), host_offset(cp.file("i1", "disks/vdb.qcow2"), 20 * MIB))
    truncate(cp.file("i3", "domain.xml"), 10)


damage("one-worker", workers=1, record=False)(_two_faults)
damage("two-workers", workers=2, record=False)(_two_faults)


def test_one_or_two_workers_give_the_same_verdict(damaged):
    cp, one = damaged("one-worker")
    _cp, two = damaged("two-workers")
    assert (one["workers"], two["workers"]) == (1, 2)
    for key in ("outcome", "error_code", "findings", "failed_sets", "bytes_read"):
        assert one[key] == two[key], key
    timing = ("duration_s", "throughput_mib_s")
    assert [{k: v for k, v in s.items() if k not in timing} for s in one["sets"]] == \
        [{k: v for k, v in s.items() if k not in timing} for s in two["sets"]]
    assert findings(cp, one) == [
        ("CHECKSUM_MISMATCH", "i1", "disks/vdb.qcow2", ["i1", "i2", "i3"], None),
        ("SIZE_MISMATCH", "i3", "domain.xml", ["i3"], None),
    ]
    assert verdicts(cp, one) == expect(i1=["CHECKSUM_MISMATCH"], i2=["CHECKSUM_MISMATCH"],
                                       i3=["SIZE_MISMATCH", "CHECKSUM_MISMATCH"])


# ----------------------------------------------------------------------------- broken chains and manifests
@damage("no-middle", level="restore")
def _delete_i1(cp: Copy) -> None:
    shutil.rmtree(cp.set_dir("i1"))


def test_missing_middle_incremental_breaks_the_later_points(damaged):
    cp, result = damaged("no-middle")
    assert_failed(result, "CHAIN_BROKEN")
    assert findings(cp, result) == [("CHAIN_BROKEN", "i2", "manifest.json", ["i2", "i3"], "i1")]
    assert verdicts(cp, result) == expect(("full", "i2", "i3", "other"), i2=["CHAIN_BROKEN"], i3=["CHAIN_BROKEN"])
    # level=restore read the sound points through their chains and left the broken ones alone.
    present = ("full", "i2", "i3", "other")
    assert result["bytes_read"] == sum(file_sizes(cp.set_dir(label)) for label in present) + \
        chain_read_bytes(cp, "full") + chain_read_bytes(cp, "other")


@damage("no-full")
def _delete_the_full(cp: Copy) -> None:
    shutil.rmtree(cp.set_dir("full"))


def test_missing_full_breaks_every_incremental(damaged):
    cp, result = damaged("no-full")
    assert_failed(result, "CHAIN_BROKEN")
    assert findings(cp, result) == [("CHAIN_BROKEN", "i1", "manifest.json", ["i1", "i2", "i3"], "full")]
    assert verdicts(cp, result) == expect(("i1", "i2", "i3", "other"), i1=["CHAIN_BROKEN"], i2=["CHAIN_BROKEN"],
                                          i3=["CHAIN_BROKEN"])


@damage("renamed")
def _rename_in_the_full_manifest(cp: Copy) -> None:
    def rename(m):
        m["vm"]["name"] = "renamed-by-hand"

    cp.rewrite_manifest("full", rename)


def test_edited_manifest_breaks_the_link_of_its_child(damaged):
    cp, result = damaged("renamed")
    assert_failed(result, "CHAIN_BROKEN")
    # The full's files still match its (edited) manifest; only its child can tell it was changed.
    assert findings(cp, result) == [("CHAIN_BROKEN", "i1", "manifest.json", ["i1", "i2", "i3"], "full")]
    assert verdicts(cp, result) == expect(i1=["CHAIN_BROKEN"], i2=["CHAIN_BROKEN"], i3=["CHAIN_BROKEN"])


@damage("edited-records")
def _edit_file_records(cp: Copy) -> None:
    def change(m):
        m["files"]["disks/vda.qcow2"]["sha256"] = "0" * 64
        m["files"]["disks/vdb.qcow2"]["size"] += 512

    cp.rewrite_manifest("i1", change)


def test_edited_file_records_are_found_in_the_set_and_break_the_link(damaged):
    cp, result = damaged("edited-records")
    assert_failed(result, "SIZE_MISMATCH")
    assert findings(cp, result) == [
        ("SIZE_MISMATCH", "i1", "disks/vdb.qcow2", ["i1", "i2", "i3"], None),
        ("CHECKSUM_MISMATCH", "i1", "disks/vda.qcow2", ["i1", "i2", "i3"], None),
        ("CHAIN_BROKEN", "i2", "manifest.json", ["i2", "i3"], "i1"),
    ]
    codes = ["SIZE_MISMATCH", "CHECKSUM_MISMATCH"]
    assert verdicts(cp, result) == expect(i1=codes, i2=["CHAIN_BROKEN", *codes], i3=["CHAIN_BROKEN", *codes])


@damage("unparsable", level="restore")
def _cut_a_manifest(cp: Copy) -> None:
    path = cp.file("i2", "manifest.json")
    write_bytes(path, path.read_bytes()[:-40])


def test_unparsable_manifest_is_repository_format(damaged):
    cp, result = damaged("unparsable")
    assert_failed(result, "REPOSITORY_FORMAT")
    assert findings(cp, result) == [
        ("REPOSITORY_FORMAT", "i2", "manifest.json", ["i2", "i3"], None),
        ("CHAIN_BROKEN", "i3", "manifest.json", ["i3"], "i2"),
    ]
    assert verdicts(cp, result) == expect(i2=["REPOSITORY_FORMAT"], i3=["REPOSITORY_FORMAT", "CHAIN_BROKEN"])
    i2 = next(s for s in result["sets"] if s["set_id"] == cp.built.ids["i2"])
    assert i2["type"] is None and i2["files_checked"] == 0


@damage("no-checksum")
def _drop_a_checksum(cp: Copy) -> None:
    def drop(m):
        del m["files"]["disks/vda.qcow2"]

    cp.rewrite_manifest("i1", drop)


def test_file_without_checksum_is_a_checksum_mismatch(damaged):
    cp, result = damaged("no-checksum")
    assert_failed(result, "CHECKSUM_MISMATCH")
    assert findings(cp, result) == [
        ("CHECKSUM_MISMATCH", "i1", "disks/vda.qcow2", ["i1", "i2", "i3"], None),
        ("CHAIN_BROKEN", "i2", "manifest.json", ["i2", "i3"], "i1"),
    ]
    assert verdicts(cp, result) == expect(i1=["CHECKSUM_MISMATCH"], i2=["CHAIN_BROKEN", "CHECKSUM_MISMATCH"],
                                          i3=["CHAIN_BROKEN", "CHECKSUM_MISMATCH"])


# ----------------------------------------------------------------------------- scope and arguments
def test_scopes(ansible, copy):
    cp = copy
    built = cp.built

    def labels_of(result):
        return [cp.labels[s["set_id"]] for s in result["sets"]]

    point = verify(ansible, cp, set_id=built.ids["i2"])
    assert not point["failed"] and labels_of(point) == ["full", "i1", "i2"], point
    assert cp.sidecars() == sorted(str(cp.sidecar(label)) for label in ("full", "i1", "i2"))
    assert point["bytes_read"] == sum(file_sizes(cp.set_dir(label)) for label in ("full", "i1", "i2"))

    refused = [
        ({"set_id": "20000101T000000Z-001"}, "SET_NOT_FOUND"),
        ({"name": built.other.name, "set_id": built.ids["i2"]}, "SET_NOT_FOUND"),  # a point of another VM
        ({"name": "no-such-vm"}, "SET_NOT_FOUND"),
        ({"uuid": str(uuid.uuid4())}, "SET_NOT_FOUND"),
        ({"set_id": "latest"}, "INVALID_NAME"),
        ({"repository": str(cp.path / "nope")}, "REPOSITORY_NOT_FOUND"),
    ]
    by_uuid, by_name, *results = verify_side_by_side(
        ansible, cp, [(False, {"uuid": built.vm.uuid.upper(), "record": False}), (False, {"name": built.other.name, "record": False})]
        + [(False, args) for args, _code in refused])
    assert not by_uuid["failed"] and labels_of(by_uuid) == list(CHAIN), by_uuid
    assert not by_name["failed"] and labels_of(by_name) == ["other"], by_name
    for (args, code), result in zip(refused, results):
        assert result["failed"] and result.get("error_code") == code, (args, result)


@damage("outside-the-scope", set_id=lambda built: built.ids["i2"])
def _damage_outside_the_scope(cp: Copy) -> None:
    cp.file("i3", "disks/vda.qcow2").unlink()  # outside the scope of i2
    (cp.set_dir("i1") / "stray.txt").write_text("not listed in the manifest")  # a warning, not a fault


def test_what_is_never_read_is_not_a_finding(damaged):
    cp, result = damaged("outside-the-scope")
    assert not result["failed"] and verdicts(cp, result) == expect(("full", "i1", "i2")), result
    assert [s["files_checked"] for s in result["sets"]] == [len(cp.manifest(label)["files"]) for label in ("full", "i1", "i2")]


def test_verify_shares_the_lock_with_readers_and_waits_for_a_writer(ansible, copy):
    cp = copy
    args = {"uuid": cp.built.vm.uuid, "record": False, "lock_timeout": 1}
    lock = cp.path / "vms" / cp.built.vm.uuid / "lock"
    with open(lock, "rb") as reader:
        fcntl.flock(reader, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another verify or a restore
        shared = verify(ansible, cp, **args)
    assert not shared["failed"] and shared["outcome"] == "ok", shared
    with open(lock, "rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX | fcntl.LOCK_NB)  # an export
        locked = verify(ansible, cp, **args)
    assert locked["failed"] and locked["error_code"] == "VM_LOCKED", locked


def test_damage_found_through_an_older_point_stops_the_chain(ansible, copy):
    cp = copy
    built = cp.built
    image = cp.file("full", "disks/vda.qcow2")
    flip(image, host_offset(image, 4 * MIB))
    failed = verify(ansible, cp, set_id=built.ids["i1"])
    assert_failed(failed, "CHECKSUM_MISMATCH")
    # The finding says that every later point reads the damaged file ...
    assert findings(cp, failed) == [("CHECKSUM_MISMATCH", "full", "disks/vda.qcow2", list(CHAIN), None)]
    # ... so the next export must not build on the newest of them (check mode: the VM is left as it is).
    predicted = ansible("export", {"name": built.vm.name, "repository": str(cp.path)}, check=True)
    assert predicted["type"] == "full" and "verify" in predicted["reason"], predicted


# ----------------------------------------------------------------------------- export honours the verdict
def test_export_after_a_failed_verify_starts_a_new_chain(ansible, copy):
    cp = copy
    built = cp.built
    image = cp.file("i3", "disks/vdb.qcow2")
    flip(image, host_offset(image, 28 * MIB))
    failed = verify(ansible, cp, set_id=built.ids["i3"])
    assert_failed(failed, "CHECKSUM_MISMATCH")
    assert json.loads(cp.sidecar("i3").read_text())["outcome"] == "failed"

    export = ansible("export", {"name": built.vm.name, "repository": str(cp.path)})
    assert export["changed"] and export["type"] == "full", export
    assert export["parent"] is None and export["chain_id"] != cp.manifest("full")["chain_id"]
    assert built.ids["i3"] in export["reason"] and "verify" in export["reason"], export["reason"]
    assert (cp.sets_dir("i3") / export["set_id"] / "manifest.json").is_file()
