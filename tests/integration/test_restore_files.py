"""vmbackup.libvirt.restore and the files it writes and deletes, against a real libvirtd and QEMU.

Trust (who may influence what root writes or deletes), privacy while images are written,
restore journals, images other domains still use, and two restores at once. Every outcome is
checked with another path than the module's: lstat, sha256, qemu-img compare, libvirt's XML.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import socket
import stat
import subprocess
import sys
import threading
import uuid
import xml.etree.ElementTree as ET

import libvirt
import pytest

from harness import (
    DiskSpec,
    Domains,
    PREFIX,
    VmFactory,
    expect_error,
    expect_ok,
    images_equal,
    listing,
    make_dir,
    run,
    sha256,
)

# As conftest.REPO_BASE: QEMU (libvirt-qemu) can traverse it.
REPO_BASE = pathlib.Path("/var/tmp/vmbackup-tests")
JOURNAL_PREFIX = ".vmbackup-restore-"
NOBODY = 65534


# ----------------------------------------------------------------------------- helpers
def file_disk(path: pathlib.Path, target: str) -> str:
    return (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{path}'/>"
            f"<target dev='{target}' bus='virtio'/></disk>")


def define_domain(conn, domain_type: str, name: str, devices: str) -> object:
    return conn.defineXML(
        f"<domain type='{domain_type}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>{devices}</devices></domain>")


def disk_sources(dom) -> dict[str, str]:
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    return {d.find("target").get("dev"): d.find("source").get("file")
            for d in root.findall("./devices/disk") if d.find("source") is not None}


def qcow2(path: pathlib.Path, size: str = "16M", pattern: int | None = None) -> pathlib.Path:
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size])
    if pattern is not None:
        run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} 0 2M", str(path)])
    return path


def dead_pid() -> int:
    for _attempt in range(5):
        proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
        pid = int(proc.stdout)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
    raise AssertionError("every exited child's pid was reused at once")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def module_dir():
    REPO_BASE.mkdir(mode=0o711, exist_ok=True)
    os.chmod(REPO_BASE, 0o711)
    path = make_dir(REPO_BASE / f"restore-files-{uuid.uuid4().hex[:10]}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def module_vms(conn, domain_type):
    factory = VmFactory(conn, domain_type)
    yield factory
    factory.cleanup()


@dataclasses.dataclass
class Source:
    vm: object
    repo: pathlib.Path
    set_id: str
    disk: pathlib.Path  # the shut-off VM's disk: what every restore of the set must equal

    def args(self, **kw) -> dict:
        args = {"repository": str(self.repo), "name": self.vm.name}
        args.update({k: str(v) if isinstance(v, pathlib.Path) else v for k, v in kw.items()})
        return args


@pytest.fixture(scope="module")
def source(ansible, module_vms, module_dir) -> Source:
    """A shut-off VM with a 512 MiB disk holding 320 MiB of data, backed up once (a copy): big
    enough that a restore takes a while (to watch it, or race it), built once for the module."""
    vm = module_vms.create([DiskSpec("512M", fill=[(0x5C, "0", "192M"), (0x5D, "256M", "128M")])], running=False)
    repo = make_dir(module_dir / "repo")  # an existing empty directory: export initialises it
    result = ansible("export", {"name": vm.name, "repository": str(repo)})
    assert result["changed"] and result["type"] == "copy", result
    return Source(vm, repo, result["set_id"], vm.disks["vda"])


@pytest.fixture
def domains(conn):
    registry = Domains(conn, 'rf')
    yield registry
    registry.cleanup()


@pytest.fixture
def work(module_dir):
    path = make_dir(module_dir / uuid.uuid4().hex[:8])
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- item 1: trust of the disk directory
def _untrusted(work: pathlib.Path, case: str) -> pathlib.Path:
    if case == "owned-by-another-user":
        path = make_dir(work / "theirs", 0o755)
        os.chown(path, NOBODY, NOBODY)
    elif case == "world-writable":
        path = make_dir(work / "open", 0o777)
    elif case == "group-writable":
        path = make_dir(work / "group", 0o770)
    elif case == "parent-owned-by-another-user":
        parent = make_dir(work / "parent", 0o755)
        path = make_dir(parent / "images")
        os.chown(parent, NOBODY, NOBODY)
    elif case == "through-a-symlink":
        real = make_dir(work / "real")
        path = work / "link"
        path.symlink_to(real)
    else:
        raise AssertionError(case)
    return path


@pytest.mark.parametrize("case", ["owned-by-another-user", "world-writable", "group-writable",
                                  "parent-owned-by-another-user", "through-a-symlink"])
def test_untrusted_disk_dir_is_refused_before_anything_is_written(ansible, source, work, domains, case):
    disk_dir = _untrusted(work, case)
    name = domains.new_name()
    before = listing(work) + listing(disk_dir)
    for check in (True, False):
        result = expect_error(ansible("restore", source.args(restore_as=name, disk_dir=disk_dir), check=check), "UNSAFE_TARGET")
        assert "disk_dir" in result["msg"] and result.get("unsafe_path"), result
    assert domains.lookup(name) is None
    assert listing(work) + listing(disk_dir) == before


def test_untrusted_storage_pool_directory_is_refused(ansible, conn, source, work, domains):
    pool_dir = make_dir(work / "pool", 0o755)
    os.chown(pool_dir, NOBODY, NOBODY)
    pool_name = f"{PREFIX}pool-{uuid.uuid4().hex[:8]}"
    pool = conn.storagePoolCreateXML(f"<pool type='dir'><name>{pool_name}</name><target><path>{pool_dir}</path></target></pool>", 0)
    try:
        name = domains.new_name()
        for check in (True, False):
            result = expect_error(ansible("restore", source.args(restore_as=name, storage_pool=pool_name), check=check),
                                  "UNSAFE_TARGET")
            assert pool_name in result["msg"], result
        assert domains.lookup(name) is None and listing(pool_dir) == []
    finally:
        pool.destroy()


def test_replace_never_deletes_through_a_swapped_directory_link(ansible, conn, domain_type, work, domains):
    """The replaced VM's disk directory is swapped for a link to another directory after the
    backup: the old image "in" it is really another file, which root must not delete."""
    images = make_dir(work / "images")
    vmdir = make_dir(work / "vm")
    disk = qcow2(vmdir / "a.qcow2", pattern=0x41)
    name = domains.new_name("swap")
    define_domain(conn, domain_type, name, file_disk(disk, "vda"))
    repo = make_dir(work / "repo")  # an existing empty directory: export initialises it
    assert ansible("export", {"name": name, "repository": str(repo)})["type"] == "copy"
    victim_dir = make_dir(work / "victim")
    victim = victim_dir / "a.qcow2"
    victim.write_bytes(os.urandom(64 * 1024))
    digest = sha256(victim)
    os.rename(vmdir, work / "vm-moved")
    (work / "vm").symlink_to(victim_dir)

    args = {"repository": str(repo), "name": name, "overwrite": "replace", "disk_dir": str(images)}
    predicted = ansible("restore", args, check=True)
    result = expect_ok(ansible("restore", args))
    assert victim.exists() and sha256(victim) == digest
    assert predicted["kept_disks"] == result["kept_disks"], predicted
    assert result["removed_disks"] == [], result
    assert [k["path"] for k in result["kept_disks"]] == [str(disk)] and "symbolic link" in result["kept_disks"][0]["reason"]


# ----------------------------------------------------------------------------- item 2: private while written
def test_partial_image_is_never_readable_by_others_while_written(ansible, source, work, domains):
    disk_dir = make_dir(work / "images")
    seen: dict[str, set[int]] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for name in os.listdir(disk_dir):
                try:
                    st = os.lstat(disk_dir / name)
                except FileNotFoundError:
                    continue
                seen.setdefault(name, set()).add(stat.S_IMODE(st.st_mode) | (stat.S_IFMT(st.st_mode) << 12))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        name = domains.new_name()
        result = expect_ok(ansible("restore", source.args(restore_as=name, disk_dir=disk_dir)))
    finally:
        done.set()
        watcher.join(10)
    partials = {n: modes for n, modes in seen.items() if ".partial-" in n}
    assert partials, f"the watcher never saw the partial image: {sorted(seen)}"
    for file_name, modes in seen.items():
        for mode in modes:
            assert mode & 0o077 == 0, f"{file_name} was mode {mode & 0o7777:04o} at some moment"
            assert stat.S_ISREG(mode >> 12), f"{file_name} was not a regular file"
    final = pathlib.Path(result["disks"][0]["path"])
    assert stat.S_IMODE(final.stat().st_mode) == 0o600
    assert images_equal(str(final), str(source.disk), force_share=False)[0]
    assert listing(disk_dir) == [final.name]


# ----------------------------------------------------------------------------- item 3: journals
def _plant_journal(disk_dir: pathlib.Path, token: str, data: dict, owner: int = 0) -> pathlib.Path:
    path = disk_dir / f"{JOURNAL_PREFIX}{token}.json"
    path.write_text(json.dumps(data))
    os.chmod(path, 0o600)
    os.chown(path, owner, owner)
    return path


def _victims(disk_dir: pathlib.Path) -> dict[pathlib.Path, str]:
    """Files a hostile journal names: an image in the directory and the NVRAM directory's neighbours."""
    victims = {}
    for name in ("victim.qcow2", "web01-vda-20261125T073512Z-001.qcow2"):
        path = disk_dir / name
        path.write_bytes(os.urandom(128 * 1024))
        victims[path] = sha256(path)
    return victims


def test_journal_planted_by_another_user_is_not_trusted(ansible, source, work, domains):
    disk_dir = make_dir(work / "images")
    victims = _victims(disk_dir)
    journal = _plant_journal(disk_dir, "0123456789abcdef", {
        "pid": dead_pid(), "host": socket.gethostname(), "phase": "writing", "target": "x",
        "temps": [str(p) for p in victims], "finals": [str(p) for p in victims]}, owner=NOBODY)
    result = expect_ok(ansible("restore", source.args(restore_as=domains.new_name(), disk_dir=disk_dir)))
    for path, digest in victims.items():
        assert path.exists() and sha256(path) == digest, path
    assert journal.exists() and result["cleaned_up"] == []


def test_root_journal_removes_only_what_its_own_restore_made(ansible, conn, domain_type, source, work, domains):
    disk_dir = make_dir(work / "images")
    victims = _victims(disk_dir)
    # Its run's image that a domain uses (killed after defining, before the journal said so).
    used = qcow2(disk_dir / "used-vda.qcow2", pattern=0x55)
    victims[used] = sha256(used)
    define_domain(conn, domain_type, domains.new_name("used"), file_disk(used, "vda"))
    token = "fedcba9876543210"
    # What the journal's run really left: its partial image (its token) and a renamed image
    # whose inode the journal recorded.
    own_partial = disk_dir / f".mine-vda.qcow2.partial-{token}"
    own_partial.write_bytes(b"partial")
    own_final = disk_dir / "mine-vda.qcow2"
    own_final.write_bytes(b"final")
    st = own_final.stat()
    victim, other = list(victims)[:2]
    files = [
        {"dir": str(disk_dir), "final": own_final.name, "partial": f".{own_final.name}.partial-{token}", "kind": "file",
         "dev": st.st_dev, "ino": st.st_ino},
        {"dir": str(disk_dir), "final": used.name, "kind": "file", "dev": used.stat().st_dev, "ino": used.stat().st_ino},
        # A final name without its inode, and one whose recorded inode is another file's.
        {"dir": str(disk_dir), "final": victim.name, "partial": "x", "kind": "file", "dev": None, "ino": None},
        {"dir": str(disk_dir), "final": other.name, "partial": "x", "kind": "file", "dev": st.st_dev, "ino": st.st_ino + 1},
        # Names outside the journal's directories.
        {"dir": str(work), "final": "outside", "kind": "file", "dev": None, "ino": None},
        {"dir": str(disk_dir), "final": "../victim.qcow2", "kind": "file", "dev": None, "ino": None},
    ]
    (work / "outside").write_text("keep")
    _plant_journal(disk_dir, token, {"format": "vmbackup.libvirt/restore-journal", "version": 2, "token": token,
                                     "pid": dead_pid(), "host": socket.gethostname(), "phase": "writing",
                                     "target": "x", "files": files})
    # A format-1 journal naming the victims as finals and as temps that are not its partial names.
    _plant_journal(disk_dir, "00000000000000aa", {"pid": dead_pid(), "host": socket.gethostname(), "phase": "writing",
                                                  "temps": [str(p) for p in victims], "finals": [str(p) for p in victims]})
    # A journal of a finished restore ("defined"): its final names are a live VM's images.
    defined_token = "00000000000000bb"
    _plant_journal(disk_dir, defined_token, {"format": "vmbackup.libvirt/restore-journal", "version": 2,
                                             "token": defined_token, "pid": dead_pid(), "host": socket.gethostname(),
                                             "phase": "defined", "target": "y",
                                             "files": [{"dir": str(disk_dir), "final": victim.name, "kind": "file",
                                                        "dev": victim.stat().st_dev, "ino": victim.stat().st_ino}]})
    name = domains.new_name()
    result = expect_ok(ansible("restore", source.args(restore_as=name, disk_dir=disk_dir)))
    for path, digest in victims.items():
        assert path.exists() and sha256(path) == digest, path
    assert (work / "outside").read_text() == "keep"
    assert not own_partial.exists() and not own_final.exists()
    restored = pathlib.Path(result["disks"][0]["path"]).name
    assert listing(disk_dir) == sorted([restored] + [p.name for p in victims])
    assert f"removed {own_partial} of an interrupted restore" in result["cleaned_up"]
    assert f"removed {own_final} of an interrupted restore" in result["cleaned_up"]


# ----------------------------------------------------------------------------- item 8: images other domains use
@pytest.mark.parametrize("use", ["backing-file", "disk"])
def test_replace_keeps_an_old_image_another_domain_uses(ansible, conn, domain_type, work, domains, use):
    images = make_dir(work / "images")
    src = make_dir(work / "src")
    a = qcow2(src / "a.qcow2", pattern=0x4A)
    name_a = domains.new_name("a")
    define_domain(conn, domain_type, name_a, file_disk(a, "vda"))
    repo = make_dir(work / "repo")  # an existing empty directory: export initialises it
    assert ansible("export", {"name": name_a, "repository": str(repo)})["type"] == "copy"
    name_b = domains.new_name("b")
    if use == "backing-file":
        b = src / "b.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(a), "-F", "qcow2", str(b)])
    else:
        b = a
    dom_b = define_domain(conn, domain_type, name_b, file_disk(b, "vda"))
    digest = sha256(a)
    args = {"repository": str(repo), "name": name_a, "overwrite": "replace", "disk_dir": str(images)}

    predicted = ansible("restore", args, check=True)
    result = expect_ok(ansible("restore", args))
    assert a.exists() and sha256(a) == digest
    assert result["removed_disks"] == [] and [k["path"] for k in result["kept_disks"]] == [str(a)], result
    assert name_b in result["kept_disks"][0]["reason"], result["kept_disks"]
    assert predicted["kept_disks"] == result["kept_disks"], (predicted.get("kept_disks"), result["kept_disks"])
    # A got its new image; B still starts and reads its data through the kept image.
    assert disk_sources(conn.lookupByName(name_a))["vda"] == result["disks"][0]["path"] != str(a)
    dom_b.create()
    try:
        assert dom_b.isActive()
        assert images_equal(str(b), result["disks"][0]["path"])[0]
    finally:
        dom_b.destroy()


def test_replace_still_removes_an_old_image_nobody_uses(ansible, conn, domain_type, work, domains):
    images = make_dir(work / "images")
    src = make_dir(work / "src")
    a = qcow2(src / "a.qcow2", pattern=0x4B)
    unrelated = qcow2(src / "u.qcow2", pattern=0x4C)
    name_a = domains.new_name("a")
    define_domain(conn, domain_type, name_a, file_disk(a, "vda"))
    define_domain(conn, domain_type, domains.new_name("u"), file_disk(unrelated, "vda"))
    repo = make_dir(work / "repo")  # an existing empty directory: export initialises it
    assert ansible("export", {"name": name_a, "repository": str(repo)})["type"] == "copy"
    args = {"repository": str(repo), "name": name_a, "overwrite": "replace", "disk_dir": str(images)}
    assert ansible("restore", args, check=True)["kept_disks"] == []
    result = expect_ok(ansible("restore", args))
    assert result["removed_disks"] == [str(a)] and result["kept_disks"] == [], result
    assert not a.exists() and unrelated.exists()


# ----------------------------------------------------------------------------- item 9: two restores at once
def test_two_restores_to_one_name_at_once(ansible, conn, source, work, domains):
    disk_dir = make_dir(work / "images")
    name = domains.new_name("race")
    args = source.args(restore_as=name, disk_dir=disk_dir)
    pending = [ansible.popen_result("restore", args) for dummy in range(2)]
    results = [p.result(timeout=600) for p in pending]
    assert not any(r["failed"] for r in results), json.dumps(results, indent=1)[:4000]
    assert sorted(r["changed"] for r in results) == [False, True], [r["msg"] for r in results]
    assert "already restored" in next(r for r in results if not r["changed"])["msg"]
    dom = conn.lookupByName(name)
    image = disk_sources(dom)["vda"]
    assert os.path.isfile(image) and listing(disk_dir) == [os.path.basename(image)]
    assert images_equal(image, str(source.disk), force_share=False)[0]

    # "Already restored" holds only while the domain has its disks.
    os.unlink(image)
    result = expect_error(ansible("restore", args), "TARGET_VM_EXISTS")
    assert "missing" in result["msg"] and image in result["msg"], result
