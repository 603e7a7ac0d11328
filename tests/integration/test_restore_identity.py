"""Whose identity a restored VM gets, what it is defined with, and what the restore says about it
(issue 8: items 10, 11, 12, 13, 15, 16), against a real libvirtd, QEMU and qemu-img.

Every outcome is checked through libvirt's own XML and qemu-img compare against a reference
copy, never through the module's result alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import uuid
import xml.etree.ElementTree as ET

import libvirt
import pytest

import subprocess

from harness import (
    Domains,
    PREFIX,
    Vm,
    destroy_vm,
    expect_error,
    expect_ok,
    images_equal,
    listing,
    make_dir,
    parse_result,
    run,
    tree_state,
)

REPO_BASE = pathlib.Path("/var/tmp/vmbackup-tests")
SECRET = "s3cr3tPw"
# Keys the ansible CLI adds to some results only (warnings when there are any).
ANSIBLE_KEYS = {"warnings", "deprecations", "invocation", "_output"}


# ----------------------------------------------------------------------------- helpers
def with_diff(ansible, module: str, args: dict, check: bool = False) -> dict:
    """A module run with --diff; verbosity 3 keeps the diff in the printed result (the callback
    shows it as a unified diff and drops it from the result below that)."""
    proc = subprocess.run(ansible.argv(module, args, check) + ["--diff"], env=dict(ansible.env, ANSIBLE_VERBOSITY="3"),
                          capture_output=True, text=True, timeout=600, check=False)
    result = parse_result(proc.stdout, proc.stderr)
    if "diff" in result and result["diff"]["before"] != result["diff"]["after"]:
        assert f"after: {result['diff']['after_header']}" in proc.stdout, "ansible shows the diff"
    result["_output"] = proc.stdout + proc.stderr  # warnings are shown, not returned
    return result


def warned(result: dict, *fragments: str) -> bool:
    text = " ".join(result["_output"].split())
    return all(f in text for f in fragments)


def inactive_xml(dom) -> ET.Element:
    return ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def disk_sources(dom, live: bool = False) -> dict[str, str | None]:
    root = ET.fromstring(dom.XMLDesc(0)) if live else inactive_xml(dom)
    out = {}
    for disk in root.findall("./devices/disk"):
        source = disk.find("source")
        out[disk.find("target").get("dev")] = source.get("file") if source is not None else None
    return out


def macs(dom) -> list[str | None]:
    out = []
    for iface in inactive_xml(dom).findall("./devices/interface"):
        mac = iface.find("mac")
        out.append(mac.get("address") if mac is not None else None)
    return out


def qcow2(path: pathlib.Path, size: str, fill: list[tuple[int, str, str]] = ()) -> pathlib.Path:
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size])
    for pattern, offset, length in fill:
        run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {length}", str(path)])
    return path


def reference(image: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    run(["qemu-img", "convert", "-U", "-O", "qcow2", str(image), str(dest)])
    return dest


def define_vm(conn, domain_type: str, name: str, disks: dict[str, pathlib.Path], mac_list: list[str],
              vm_uuid: str | None = None) -> object:
    """A shut-off VM with qcow2 disks, a network and a bridge interface (neither needs to exist to
    define it), and a VNC password (for the masking in results and diffs)."""
    disk_xml = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{path}'/>"
        f"<target dev='{target}' bus='virtio'/></disk>" for target, path in disks.items())
    iface_xml = (f"<interface type='network'><mac address='{mac_list[0]}'/><source network='netA'/><model type='virtio'/></interface>"
                 f"<interface type='bridge'><mac address='{mac_list[1]}'/><source bridge='brA'/><model type='virtio'/></interface>")
    head = f"<uuid>{vm_uuid}</uuid>" if vm_uuid else ""
    xml = (f"<domain type='{domain_type}'><name>{name}</name>{head}<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
           "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
           f"<devices>{disk_xml}{iface_xml}<graphics type='vnc' autoport='yes' passwd='{SECRET}'/></devices></domain>")
    return conn.defineXML(xml)


def random_macs() -> list[str]:
    token = uuid.uuid4().hex
    return [f"52:54:00:{token[0:2]}:{token[2:4]}:{i:02x}" for i in (1, 2)]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def module_dir():
    REPO_BASE.mkdir(mode=0o711, exist_ok=True)
    os.chmod(REPO_BASE, 0o711)
    path = make_dir(REPO_BASE / f"identity-{uuid.uuid4().hex[:10]}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def module_domains(conn):
    registry = Domains(conn, 'id')
    yield registry
    registry.cleanup()


@pytest.fixture
def domains(conn):
    registry = Domains(conn, 'id')
    yield registry
    registry.cleanup()


@pytest.fixture
def disk_dir(module_dir) -> pathlib.Path:
    return make_dir(module_dir / f"images-{uuid.uuid4().hex[:6]}")


@dataclasses.dataclass
class Source:
    """A shut-off VM backed up once (a copy set): vda in the backup, vdb (the 'production'
    scratch disk) excluded from it."""

    name: str
    uuid: str
    dom: object
    macs: list[str]
    vda: pathlib.Path
    vdb: pathlib.Path
    ref: pathlib.Path  # vda at backup time
    repo: pathlib.Path
    set_id: str
    tree: dict

    def args(self, **kw) -> dict:
        args = {"repository": str(self.repo), "name": self.name}
        args.update({k: str(v) if isinstance(v, pathlib.Path) else v for k, v in kw.items()})
        return args


@pytest.fixture(scope="module")
def source(ansible, conn, domain_type, module_dir, module_domains) -> Source:
    src = make_dir(module_dir / "src")
    vda = qcow2(src / "vda.qcow2", "32M", [(0x5A, "0", "2M"), (0x5B, "20M", "1M")])
    vdb = qcow2(src / "vdb.qcow2", "8M", [(0x6C, "0", "1M")])
    name = module_domains.new_name("src")
    mac_list = random_macs()
    dom = define_vm(conn, domain_type, name, {"vda": vda, "vdb": vdb}, mac_list)
    repo = make_dir(module_dir / "repo")  # an existing empty directory: export initialises it
    export = ansible("export", {"name": name, "repository": str(repo), "exclude_disks": ["vdb"]})
    assert export["changed"] and export["type"] == "copy", export
    ref = reference(vda, module_dir / "ref-vda.qcow2")
    return Source(name, dom.UUIDString(), dom, mac_list, vda, vdb, ref, repo, export["set_id"], tree_state(repo))


# ----------------------------------------------------------------------------- item 10: replace keeps whose identity
def test_replacing_a_restored_copy_keeps_the_copys_identity(ansible, conn, source, disk_dir, module_domains):
    copy_name = module_domains.new_name("copy")
    first = expect_ok(with_diff(ansible, "restore", source.args(restore_as=copy_name, disk_dir=disk_dir)))
    assert first["dropped_disks"] == ["vdb"]
    copy = conn.lookupByName(copy_name)
    copy_uuid, copy_macs = copy.UUIDString(), macs(copy)
    assert copy_uuid != source.uuid and len(copy_macs) == 2 and not set(copy_macs) & set(source.macs)
    source_xml = ET.tostring(inactive_xml(source.dom))

    # The drill: the copy is reset to the backup by replacing it.
    replaced = expect_ok(with_diff(ansible, "restore", source.args(restore_as=copy_name, overwrite="replace", disk_dir=disk_dir)))
    dom = conn.lookupByName(copy_name)
    assert dom.UUIDString() == copy_uuid == replaced["vm"]["uuid"], "the copy keeps its own UUID"
    assert macs(dom) == copy_macs, "the copy keeps its own MAC addresses, interface by interface"
    assert not set(macs(dom)) & set(source.macs)
    sources = disk_sources(dom)
    assert str(source.vdb) not in sources.values(), "the production VM's disk is never attached to the copy"
    assert sorted(sources) == ["vda"] and replaced["dropped_disks"] == ["vdb"]
    same, out = images_equal(sources["vda"], str(source.ref), force_share=False)
    assert same, out
    assert (first["identity"], replaced["identity"]) == ("new", "target") and replaced["vm"]["replaced"] is True
    # The source is as it was.
    assert ET.tostring(inactive_xml(source.dom)) == source_xml
    assert tree_state(source.repo) == source.tree

    # --diff (item 16): before is the copy as it was defined, after the new definition; no password.
    diff = replaced["diff"]
    assert set(diff) == {"before", "after", "before_header", "after_header"}
    before, after = ET.fromstring(diff["before"]), ET.fromstring(diff["after"])
    assert before.findtext("uuid") == after.findtext("uuid") == copy_uuid
    assert before.find("./devices/disk/source").get("file") == first["disks"][0]["path"]
    assert after.find("./devices/disk/source").get("file") == replaced["disks"][0]["path"]
    assert SECRET not in json.dumps(replaced) and SECRET in conn.lookupByName(copy_name).XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
    assert first["diff"]["before"] == "" and ET.fromstring(first["diff"]["after"]).findtext("name") == copy_name


def test_replacing_the_source_itself_gives_back_its_identity(ansible, conn, source, disk_dir):
    replaced = expect_ok(ansible("restore", source.args(overwrite="replace", disk_dir=disk_dir, keep_replaced_disks=True)))
    dom = conn.lookupByName(source.name)
    assert dom.UUIDString() == source.uuid and macs(dom) == source.macs
    sources = disk_sources(dom)
    assert sources["vdb"] == str(source.vdb), "its own disk that was not backed up stays"
    assert replaced["dropped_disks"] == []
    assert images_equal(sources["vda"], str(source.ref), force_share=False)[0]
    assert replaced["identity"] == "source"


# ----------------------------------------------------------------------------- item 11: live-attached disks
@pytest.fixture(scope="module")
def live_vm(ansible, conn, domain_type, module_dir):
    """A running VM with vdb attached live only (in the live XML, not the persistent one), backed up."""
    workdir = make_dir(module_dir / "live-src")
    vda = qcow2(workdir / "vda.qcow2", "32M", [(0x11, "0", "2M")])
    vdb = qcow2(workdir / "vdb.qcow2", "16M", [(0x77, "1M", "3M")])
    name = f"{PREFIX}live-src-{uuid.uuid4().hex[:8]}"
    # ACPI: PCI hotplug on the pc machine needs it.
    dom = conn.defineXML(
        f"<domain type='{domain_type}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{vda}'/>"
        "<target dev='vda' bus='virtio'/><alias name='ua-vda'/></disk></devices></domain>")
    try:
        dom.create()
        dom.attachDeviceFlags(
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{vdb}'/>"
            "<target dev='vdb' bus='virtio'/><alias name='ua-vdb'/></disk>", libvirt.VIR_DOMAIN_AFFECT_LIVE)
        vm = Vm(conn, dom, name, workdir, {"vda": vda, "vdb": vdb}, {"vda": "qcow2", "vdb": "qcow2"})
        vm.write("vdb", 0x78, "8M", "1M")
        assert "vdb" in disk_sources(dom, live=True) and "vdb" not in disk_sources(dom)
        repo = make_dir(module_dir / "live-repo")
        export = ansible("export", {"name": name, "repository": str(repo)})
        assert export["changed"] and export["type"] == "full", export
        assert sorted(d["target"] for d in export["disks"]) == ["vda", "vdb"], export
        refs = {tg: vm.snapshot_disk(tg, module_dir / f"live-ref-{tg}.qcow2") for tg in ("vda", "vdb")}
        yield vm, repo, export, refs
    finally:
        destroy_vm(dom)


def test_a_disk_attached_live_only_is_restored_and_defined(ansible, conn, live_vm, disk_dir, domains):
    vm, repo, export, refs = live_vm
    name = domains.new_name("live")
    args = {"repository": str(repo), "name": vm.name, "restore_as": name, "disk_dir": str(disk_dir)}
    predicted = expect_ok(ansible("restore", args, check=True))
    assert sorted(d["target"] for d in predicted["disks"]) == ["vda", "vdb"]
    assert "vdb" in {d.find("target").get("dev") for d in ET.fromstring(predicted["domain_xml"]).findall("./devices/disk")}
    assert listing(disk_dir) == [] and domains.lookup(name) is None

    result = expect_ok(with_diff(ansible, "restore", args))
    assert result["dropped_disks"] == []
    assert warned(result, "disk vdb was attached to the running VM only"), result["_output"][-3000:]
    dom = conn.lookupByName(name)
    sources = disk_sources(dom)  # the persistent definition
    paths = {d["target"]: d["path"] for d in result["disks"]}
    assert sources == paths and sorted(sources) == ["vda", "vdb"]
    vdb = next(d for d in inactive_xml(dom).findall("./devices/disk") if d.find("target").get("dev") == "vdb")
    assert vdb.find("alias").get("name") == "ua-vdb"
    for target in ("vda", "vdb"):
        same, out = images_equal(paths[target], str(refs[target]), force_share=False)
        assert same, (target, out)
    # The restored definition starts (libvirt accepts the disk taken from the live XML).
    dom.create()
    assert "vdb" in disk_sources(dom, live=True)
    # The source VM is untouched: vdb is still attached live only.
    assert "vdb" in disk_sources(vm.dom, live=True) and "vdb" not in disk_sources(vm.dom)


# ----------------------------------------------------------------------------- item 12: network_map typos
@pytest.mark.parametrize("check", [True, False], ids=["check-mode", "real"])
def test_a_network_map_key_that_matches_nothing_fails_before_writing(ansible, source, disk_dir, domains, check):
    name = domains.new_name("net")
    result = ansible("restore", source.args(restore_as=name, disk_dir=disk_dir,
                                            network_map={"netA": "isolated", "brA ": "br-test"}), check=check)
    expect_error(result, "INVALID_ARGUMENT")
    assert "'brA '" in result["msg"] and "network netA" in result["msg"] and "bridge brA" in result["msg"]
    assert result["unknown_keys"] == ["brA "]
    assert listing(disk_dir) == [] and domains.lookup(name) is None
    assert tree_state(source.repo) == source.tree


def test_a_network_map_that_matches_renames_and_warns_about_a_missing_network(ansible, conn, source, disk_dir, domains):
    name = domains.new_name("net")
    result = expect_ok(with_diff(ansible, "restore", source.args(restore_as=name, disk_dir=disk_dir,
                                                                 network_map={"netA": "vmbt-nonet"})))
    assert warned(result, "'vmbt-nonet', which is neither a libvirt network nor a bridge"), result["_output"][-3000:]
    root = inactive_xml(conn.lookupByName(name))
    assert root.find("./devices/interface[@type='network']/source").get("network") == "vmbt-nonet"
    assert root.find("./devices/interface[@type='bridge']/source").get("bridge") == "brA"


# ----------------------------------------------------------------------------- item 13: names before work
@pytest.mark.parametrize("check", [True, False], ids=["check-mode", "real"])
@pytest.mark.parametrize("bad", ["vmbt-ctl\x01name", "vmbt-new\nline", "vmbt-del\x7f", "x" * 201])
def test_restore_as_with_control_characters_fails_before_writing(ansible, source, disk_dir, conn, domains, check, bad):
    domains.names.append(bad)  # undefined afterwards should a broken build define it
    result = ansible("restore", source.args(restore_as=bad, disk_dir=disk_dir), check=check)
    expect_error(result, "INVALID_NAME")
    assert "restore_as" in result["msg"]
    assert listing(disk_dir) == [], "no image, no partial file, no journal"
    # (other test runs share this libvirtd: look for this name only)
    assert bad not in {d.name() for d in conn.listAllDomains(0)}


def _repo_with_vm_name(source: Source, dest: pathlib.Path, vm_name: str) -> pathlib.Path:
    """A copy of the repository whose manifest records another VM name."""
    shutil.copytree(source.repo, dest, symlinks=True)
    manifest = dest / "vms" / source.uuid / "sets" / source.set_id / "manifest.json"
    data = json.loads(manifest.read_text())
    data["vm"]["name"] = vm_name
    mode = manifest.stat().st_mode & 0o777
    manifest.write_text(json.dumps(data))
    os.chmod(manifest, mode)
    return dest


@pytest.mark.parametrize("check", [True, False], ids=["check-mode", "real"])
def test_a_backed_up_name_that_is_not_a_usable_name_needs_restore_as(ansible, conn, source, module_dir, disk_dir, domains,
                                                                     check):
    bad = f"{PREFIX}ctl\x02{uuid.uuid4().hex[:4]}"
    repo = _repo_with_vm_name(source, module_dir / f"ctl-repo-{uuid.uuid4().hex[:6]}", bad)
    args = {"repository": str(repo), "uuid": source.uuid, "disk_dir": str(disk_dir)}
    result = ansible("restore", args, check=check)
    expect_error(result, "INVALID_NAME")
    assert "restore_as" in result["msg"]
    assert listing(disk_dir) == []
    # Under a valid restore_as it restores; the odd source name in our marker does not break the XML.
    name = domains.new_name("ctl")
    ok = expect_ok(ansible("restore", dict(args, restore_as=name), check=check))
    assert ET.fromstring(ok["domain_xml"]).findtext("name") == name
    if not check:
        assert domains.lookup(name) is not None
    else:
        assert domains.lookup(name) is None and listing(disk_dir) == []


# ----------------------------------------------------------------------------- item 16: a rerun tells the same
def test_a_rerun_returns_the_same_fields_as_the_run_that_did_the_work(ansible, conn, source, disk_dir, domains):
    name = domains.new_name("rerun")
    args = source.args(restore_as=name, disk_dir=disk_dir)
    predicted = expect_ok(with_diff(ansible, "restore", args, check=True))
    done = expect_ok(with_diff(ansible, "restore", args))
    again_check = with_diff(ansible, "restore", args, check=True)
    again = with_diff(ansible, "restore", args)
    keys = set(done) - ANSIBLE_KEYS
    for other in (predicted, again_check, again):
        assert set(other) - ANSIBLE_KEYS == keys, sorted(keys ^ (set(other) - ANSIBLE_KEYS))
    for rerun in (again_check, again):
        assert rerun["changed"] is False and not rerun["failed"], rerun
        assert rerun["vm"] == done["vm"] and rerun["identity"] == done["identity"] == "new"
        assert [{k: v for k, v in d.items() if k != "bytes_read"} for d in rerun["disks"]] == \
            [{k: v for k, v in d.items() if k != "bytes_read"} for d in done["disks"]]
        assert rerun["bytes_read"] == rerun["bytes_written"] == 0 and rerun["estimated_bytes"] == done["estimated_bytes"]
        xml = ET.fromstring(rerun["domain_xml"])
        assert xml.findtext("uuid") == done["vm"]["uuid"] and xml.findtext("name") == name
        assert rerun["diff"]["before"] == rerun["diff"]["after"] == rerun["domain_xml"]
        assert SECRET not in json.dumps(rerun)
    # Independent: the domain libvirt has is the one both results describe.
    dom = conn.lookupByName(name)
    assert disk_sources(dom) == {d["target"]: d["path"] for d in again["disks"]}


# ----------------------------------------------------------------------------- item 15: disaster restore
def test_disaster_restore_with_the_original_identity_and_paths(ansible, conn, domain_type, module_dir, domains):
    src = make_dir(module_dir / f"dr-{uuid.uuid4().hex[:6]}")
    vda = qcow2(src / "vda.qcow2", "32M", [(0x3C, "0", "3M"), (0x3D, "17M", "2M")])
    name = domains.new_name("dr")
    mac_list = random_macs()
    dom = define_vm(conn, domain_type, name, {"vda": vda}, mac_list, vm_uuid=str(uuid.uuid4()))
    vm_uuid = dom.UUIDString()
    repo = make_dir(module_dir / f"dr-repo-{uuid.uuid4().hex[:6]}")
    export = ansible("export", {"name": name, "repository": str(repo)})
    assert export["changed"], export
    ref = reference(vda, module_dir / f"dr-ref-{uuid.uuid4().hex[:6]}.qcow2")
    args = {"repository": str(repo), "name": name, "identity": "original", "original_paths": True}
    vda_stat = vda.stat()

    # The source is still defined here: its identity is never taken twice.
    refused = expect_error(ansible("restore", args), "TARGET_VM_EXISTS")
    assert name in refused["msg"]
    renamed = domains.new_name("dr-renamed")
    dom.rename(renamed, 0)
    refused = expect_error(ansible("restore", args, check=True), "TARGET_VM_EXISTS")
    assert renamed in refused["msg"] and vm_uuid in refused["msg"]
    assert (vda.stat().st_mtime_ns, vda.stat().st_size) == (vda_stat.st_mtime_ns, vda_stat.st_size)
    assert domains.lookup(name) is None and listing(src) == ["vda.qcow2"]

    # The disaster: the VM and its disk are gone (its directory exists, as on a rebuilt host).
    destroy_vm(conn.lookupByName(renamed))
    vda.unlink()
    # A file where the disk goes is never overwritten.
    vda.write_bytes(b"someone else's")
    expect_error(ansible("restore", args), "TARGET_PATH_EXISTS")
    assert vda.read_bytes() == b"someone else's" and domains.lookup(name) is None
    vda.unlink()
    # A directory others can write is not trusted.
    os.chmod(src, 0o777)
    try:
        expect_error(ansible("restore", args), "UNSAFE_TARGET")
    finally:
        os.chmod(src, 0o711)
    assert listing(src) == [] and domains.lookup(name) is None

    predicted = expect_ok(ansible("restore", args, check=True))
    assert predicted["identity"] == "original" and predicted["vm"]["uuid"] == vm_uuid
    assert [d["path"] for d in predicted["disks"]] == [str(vda)]
    assert listing(src) == [] and domains.lookup(name) is None

    result = expect_ok(with_diff(ansible, "restore", args))
    restored = conn.lookupByName(name)
    assert restored.UUIDString() == vm_uuid and result["vm"] == {"name": name, "uuid": vm_uuid, "state": "shutoff",
                                                                 "replaced": False}
    assert result["identity"] == "original"
    assert macs(restored) == mac_list
    assert disk_sources(restored) == {"vda": str(vda)}
    same, out = images_equal(str(vda), str(ref), force_share=False)
    assert same, out
    assert result["diff"]["before"] == ""

    # A rerun finds it restored, and says so with the same fields.
    again = with_diff(ansible, "restore", args)
    assert again["changed"] is False and not again["failed"], again
    assert set(again) - ANSIBLE_KEYS == set(result) - ANSIBLE_KEYS
    assert again["identity"] == "original" and again["vm"]["uuid"] == vm_uuid
    # The default stays a new identity: beside it, a restore under a new name gets new UUID and MACs.
    copy_name = domains.new_name("dr-copy")
    copy = expect_ok(ansible("restore", {"repository": str(repo), "name": name, "restore_as": copy_name,
                                         "disk_dir": str(make_dir(module_dir / f"dr-copy-{uuid.uuid4().hex[:6]}"))}))
    assert copy["identity"] == "new" and copy["vm"]["uuid"] != vm_uuid
    assert not set(macs(conn.lookupByName(copy_name))) & set(mac_list)
