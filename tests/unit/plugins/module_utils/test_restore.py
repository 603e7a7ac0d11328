# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for the pure parts of plugins/module_utils/_restore.py (no libvirt daemon, no qemu-img)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _restore
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._restore import (
    JOURNAL_PREFIX,
    METADATA_NS,
    RestoreParams,
    restore_marker,
    restored_xml,
    safe_file_name,
    stale_journals,
    validate_params,
)

OLD_UUID = "2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
NEW_UUID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
SET_ID = "20261125T073512Z-001"
MACS = ["52:54:00:aa:00:01", "52:54:00:aa:00:02", "52:54:00:aa:00:03"]

SAVED_XML = f"""\
<domain type='kvm'>
  <name>web01</name>
  <uuid>{OLD_UUID}</uuid>
  <metadata>
    <vmbackup:restore xmlns:vmbackup="{METADATA_NS}" vm_uuid="11111111-2222-4333-8444-555555555555" set_id="20260101T000000Z-001"/>
    <app:tag xmlns:app="urn:example:app">keep me</app:tag>
  </metadata>
  <sysinfo type='smbios'>
    <system><entry name='manufacturer'>ACME</entry><entry name='uuid'>{OLD_UUID}</entry></system>
  </sysinfo>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/web01_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web01.qcow2'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/vg0/web01-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web01-scratch.qcow2'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/shared/reference.img'/>
      <target dev='vdd' bus='virtio'/>
      <readonly/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/isos/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sdb' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='floppy'>
      <source file='/isos/drivers.img'/>
      <target dev='fda' bus='fdc'/>
    </disk>
    <interface type='network'>
      <mac address='{MACS[0]}'/>
      <source network='prod'/>
      <model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <mac address='{MACS[1]}'/>
      <source bridge='br0'/>
    </interface>
    <interface type='network'>
      <mac address='{MACS[2]}'/>
      <source network='backup-net'/>
    </interface>
  </devices>
</domain>
"""

BACKED_UP = {
    "vda": ("/restore/web01-copy-vda-20261125T073512Z-001.qcow2", "qcow2"),
    "vdb": ("/restore/web01-copy-vdb-20261125T073512Z-001.qcow2", "qcow2"),
}
META = {"vm_uuid": OLD_UUID, "vm_name": "web01", "set_id": SET_ID, "restored": "2026-11-25T08:00:00Z"}


def _restored(saved: str = SAVED_XML, **overrides):
    kwargs = {
        "name": "web01-copy",
        "vm_uuid": NEW_UUID,
        "disks": BACKED_UP,
        "new_identity": True,
        "network_map": None,
        "nvram": None,
        "metadata": META,
        "existing_file": lambda _path: True,
    }
    kwargs.update(overrides)
    xml, dropped, warnings = restored_xml(saved, **kwargs)
    return ET.fromstring(xml), dropped, warnings


def _disk(root: ET.Element, target: str) -> ET.Element | None:
    for disk in root.findall("./devices/disk"):
        if disk.find("target").get("dev") == target:
            return disk
    return None


def _raises(code: str, func, *args, **kwargs) -> VmBackupError:
    with pytest.raises(VmBackupError) as info:
        func(*args, **kwargs)
    assert info.value.error_code == code, info.value.msg
    return info.value


# --------------------------------------------------------------------------- restored_xml: identity
@pytest.mark.parametrize("new_identity", [True, False])
def test_name_uuid_and_smbios_uuid_are_set(new_identity):
    root, _dropped, _warnings = _restored(new_identity=new_identity)
    assert root.findtext("name") == "web01-copy"
    assert root.findtext("uuid") == NEW_UUID
    # libvirt refuses a <sysinfo> system UUID that differs from <uuid>.
    assert root.findtext("./sysinfo/system/entry[@name='uuid']") == NEW_UUID
    assert root.findtext("./sysinfo/system/entry[@name='manufacturer']") == "ACME"
    assert len(root.findall("name")) == 1 and len(root.findall("uuid")) == 1


def test_missing_name_and_uuid_elements_are_added():
    saved = "<domain type='kvm'><devices/></domain>"
    root, dropped, warnings = _restored(saved, disks={})
    assert (root.findtext("name"), root.findtext("uuid")) == ("web01-copy", NEW_UUID)
    assert (dropped, warnings) == ([], [])


def test_a_domain_without_devices_gets_a_devices_element():
    root, _dropped, _warnings = _restored("<domain type='kvm'><name>x</name></domain>", disks={})
    assert root.find("devices") is not None


@pytest.mark.parametrize("new_identity, expected", [(True, []), (False, MACS)])
def test_macs_are_removed_for_a_new_identity_and_kept_for_a_replace(new_identity, expected):
    root, _dropped, _warnings = _restored(new_identity=new_identity)
    assert len(root.findall("./devices/interface")) == 3
    assert [m.get("address") for m in root.findall("./devices/interface/mac")] == expected


# --------------------------------------------------------------------------- restored_xml: disks
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_backed_up_disks_point_to_the_restored_images(fmt):
    disks = {target: (path, fmt) for target, (path, _fmt) in BACKED_UP.items()}
    root, _dropped, _warnings = _restored(disks=disks)
    for target, (path, _fmt) in disks.items():
        disk = _disk(root, target)
        assert disk.get("type") == "file"
        sources = disk.findall("source")
        assert [s.attrib for s in sources] == [{"file": path}]
        assert disk.find("backingStore") is None
        driver = disk.find("driver")
        assert driver.get("type") == fmt and driver.get("name") == "qemu"
        children = [c.tag for c in disk]
        assert children.index("source") == children.index("driver") + 1
    # The driver's other attributes stay; the block disk without a <driver> got one.
    assert _disk(root, "vda").find("driver").get("discard") == "unmap"
    assert list(_disk(root, "vdb"))[0].tag == "driver"


@pytest.mark.parametrize(
    "new_identity, dropped_targets",
    [
        pytest.param(True, ["vdc"], id="new-identity-drops-unbacked-writable-disk"),
        pytest.param(False, [], id="replace-keeps-unbacked-writable-disk"),
    ],
)
def test_unbacked_disks(new_identity, dropped_targets):
    root, dropped, warnings = _restored(new_identity=new_identity)
    assert dropped == dropped_targets
    present = [d.find("target").get("dev") for d in root.findall("./devices/disk")]
    expected = ["vda", "vdb", "vdc", "vdd", "sda", "sdb", "fda"]
    assert present == [t for t in expected if t not in dropped_targets]
    if dropped_targets:
        assert len(warnings) == 1 and "vdc" in warnings[0] and "left out" in warnings[0]
    else:
        assert warnings == []
        # Not backed up: it keeps pointing at its own file.
        assert _disk(root, "vdc").find("source").get("file") == "/var/lib/libvirt/images/web01-scratch.qcow2"
    # A read-only disk may be shared: kept, unchanged, for a new identity too.
    assert _disk(root, "vdd").find("source").get("file") == "/srv/shared/reference.img"


def test_a_disk_without_target_is_dropped_as_unknown():
    saved = ("<domain><name>x</name><devices><disk type='file' device='disk'><source file='/x.img'/></disk>"
             "</devices></domain>")
    root, dropped, warnings = _restored(saved, disks={})
    assert root.findall("./devices/disk") == []
    assert dropped == ["?"] and len(warnings) == 1


@pytest.mark.parametrize(
    "exists, emptied",
    [
        pytest.param(lambda _p: False, ["sda", "fda"], id="media-missing-here"),
        pytest.param(lambda p: p == "/isos/install.iso", ["fda"], id="one-missing"),
        pytest.param(lambda _p: True, [], id="media-present"),
    ],
)
def test_removable_media_whose_file_is_missing_is_left_empty(exists, emptied):
    root, dropped, warnings = _restored(existing_file=exists)
    assert dropped == ["vdc"]
    for target, path in (("sda", "/isos/install.iso"), ("fda", "/isos/drivers.img")):
        source = _disk(root, target).find("source")
        if target in emptied:
            assert source is None
            assert any(target in w and path in w and "left empty" in w for w in warnings)
        else:
            assert source.get("file") == path
    assert _disk(root, "sdb").find("source") is None  # was empty already
    assert len(warnings) == 1 + len(emptied)


# --------------------------------------------------------------------------- restored_xml: networks, NVRAM
@pytest.mark.parametrize(
    "network_map, expected",
    [
        pytest.param(None, ["prod", "br0", "backup-net"], id="no-map"),
        pytest.param({"prod": "isolated"}, ["isolated", "br0", "backup-net"], id="network"),
        pytest.param({"br0": "br-test"}, ["prod", "br-test", "backup-net"], id="bridge"),
        pytest.param({"prod": "isolated", "br0": "br-test"}, ["isolated", "br-test", "backup-net"], id="both"),
        pytest.param({"prod": "backup-net", "backup-net": "prod"}, ["backup-net", "br0", "prod"], id="swap-is-not-chained"),
    ],
)
def test_network_map_renames_networks_and_bridges(network_map, expected):
    root, _dropped, _warnings = _restored(network_map=network_map)
    sources = [s.get("network") or s.get("bridge") for s in root.findall("./devices/interface/source")]
    assert sources == expected
    types = [i.get("type") for i in root.findall("./devices/interface")]
    assert types == ["network", "bridge", "network"]


def test_nvram_points_to_the_restored_file():
    path = f"/var/lib/libvirt/qemu/nvram/web01-copy-{SET_ID}_VARS.fd"
    root, _dropped, _warnings = _restored(nvram=path)
    nvram = root.find("./os/nvram")
    assert nvram.text == path
    assert nvram.get("template") == "/usr/share/OVMF/OVMF_VARS.fd"
    assert root.findtext("./os/loader") == "/usr/share/OVMF/OVMF_CODE.fd"


def test_without_nvram_in_the_set_libvirt_makes_a_fresh_one():
    root, _dropped, _warnings = _restored(nvram=None)
    nvram = root.find("./os/nvram")
    assert not nvram.text
    assert nvram.get("template") == "/usr/share/OVMF/OVMF_VARS.fd"


def test_no_nvram_element_is_invented():
    saved = "<domain><name>x</name><os><type>hvm</type></os><devices/></domain>"
    root, _dropped, _warnings = _restored(saved, disks={}, nvram="/var/lib/libvirt/qemu/nvram/x_VARS.fd")
    assert root.find("./os/nvram") is None


# --------------------------------------------------------------------------- metadata marker
def test_metadata_marker_is_replaced_not_duplicated():
    root, _dropped, _warnings = _restored()
    ours = root.findall(f"./metadata/{{{METADATA_NS}}}restore")
    assert len(ours) == 1
    assert ours[0].attrib == META
    assert root.findtext("./metadata/{urn:example:app}tag") == "keep me"


def test_metadata_is_added_when_missing_and_reads_back():
    saved = "<domain><name>x</name><devices/></domain>"
    xml, _dropped, _warnings = restored_xml(saved, name="y", vm_uuid=NEW_UUID, disks={}, new_identity=True,
                                            network_map=None, nvram=None, metadata=META)
    assert restore_marker(xml) == META
    # Restoring the restored domain's XML again keeps exactly one marker.
    again, _dropped, _warnings = restored_xml(xml, name="z", vm_uuid=NEW_UUID, disks={}, new_identity=True,
                                              network_map=None, nvram=None, metadata=dict(META, set_id="20261126T000000Z-001"))
    assert restore_marker(again)["set_id"] == "20261126T000000Z-001"
    assert len(ET.fromstring(again).findall(f"./metadata/{{{METADATA_NS}}}restore")) == 1


def test_marker_values_become_strings():
    xml, _dropped, _warnings = restored_xml("<domain><name>x</name></domain>", name="y", vm_uuid=NEW_UUID, disks={},
                                            new_identity=True, network_map=None, nvram=None, metadata={"n": 3})
    assert restore_marker(xml) == {"n": "3"}


@pytest.mark.parametrize(
    "xml",
    [
        "<domain><name>x</name></domain>",
        "<domain><name>x</name><metadata/></domain>",
        "<domain><name>x</name><metadata><restore set_id='x'/></metadata></domain>",
        "<domain><name>x</name><metadata><o:restore xmlns:o='urn:other' set_id='x'/></metadata></domain>",
    ],
)
def test_restore_marker_is_none_without_our_element(xml):
    assert restore_marker(xml) is None


def test_restore_marker_of_the_saved_xml_is_the_old_marker():
    assert restore_marker(SAVED_XML) == {"vm_uuid": "11111111-2222-4333-8444-555555555555", "set_id": "20260101T000000Z-001"}


# --------------------------------------------------------------------------- safe_file_name
@pytest.mark.parametrize(
    "name, expected",
    [
        ("web01", "web01"),
        ("web-01_a.b", "web-01_a.b"),
        ("a b", "a_b"),
        ("a/b", "a_b"),
        ("../../etc/passwd", "_.._etc_passwd"),
        ("..", "vm"),
        (".", "vm"),
        ("...", "vm"),
        ("", "vm"),
        (".hidden", "hidden"),
        ("..hidden", "hidden"),
        ("été", "_t_"),
        ("日本語", "___"),
        ("$(reboot); rm -rf /", "__reboot___rm_-rf__"),
        ("a\nb\x00c", "a_b_c"),
        ("-rf", "-rf"),
        ("x" * 300, "x" * 80),
        ("." + "y" * 100, "y" * 80),
    ],
)
def test_safe_file_name(name, expected):
    assert safe_file_name(name) == expected


@pytest.mark.parametrize("name", ["..", "../x", "a/../../b", "/", "//", ". .", "\u2044", "..\u2215..", " " * 5, "é" * 200])
def test_safe_file_name_stays_in_its_directory(name):
    safe = safe_file_name(name)
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,80}", safe)
    assert not safe.startswith(".")
    assert os.path.dirname(os.path.normpath(os.path.join("/restore", f"{safe}-vda.qcow2"))) == "/restore"


# --------------------------------------------------------------------------- validate_params
def _params(**overrides) -> RestoreParams:
    values = {"repository": "/srv/vmbackup", "name": "web01"}
    values.update(overrides)
    return RestoreParams(**values)


@pytest.mark.parametrize(
    "overrides, code, fragment",
    [
        pytest.param({"uuid": OLD_UUID}, "INVALID_ARGUMENT", "exactly one of name and uuid", id="name-and-uuid"),
        pytest.param({"name": None}, "INVALID_ARGUMENT", "exactly one of name and uuid", id="neither"),
        pytest.param({"name": ""}, "INVALID_NAME", "name", id="empty-name"),
        pytest.param({"name": "a\x00b"}, "INVALID_NAME", "NUL", id="nul-name"),
        pytest.param({"name": None, "uuid": "not-a-uuid"}, "INVALID_NAME", "not a UUID", id="bad-uuid"),
        pytest.param({"set_id": SET_ID, "as_of": "2026-11-25"}, "INVALID_ARGUMENT", "set_id and as_of", id="set-id-and-as-of"),
        pytest.param({"set_id": "20261125T073512Z"}, "INVALID_NAME", "not a set id", id="set-id-without-seq"),
        pytest.param({"set_id": "../20261125T073512Z-001"}, "INVALID_NAME", "not a set id", id="set-id-path"),
        pytest.param({"as_of": "yesterday"}, "INVALID_ARGUMENT", "ISO 8601", id="bad-as-of"),
        pytest.param({"as_of": "2026-13-01"}, "INVALID_ARGUMENT", "ISO 8601", id="bad-as-of-date"),
        pytest.param({"as_of": " "}, "INVALID_ARGUMENT", "ISO 8601", id="blank-as-of"),
        pytest.param({"restore_as": "a/b"}, "INVALID_NAME", "restore_as", id="restore-as-slash"),
        pytest.param({"restore_as": ".."}, "INVALID_NAME", "restore_as", id="restore-as-dotdot"),
        pytest.param({"restore_as": "."}, "INVALID_NAME", "restore_as", id="restore-as-dot"),
        pytest.param({"restore_as": ""}, "INVALID_NAME", "restore_as", id="restore-as-empty"),
        pytest.param({"restore_as": "a\x00"}, "INVALID_NAME", "restore_as", id="restore-as-nul"),
        pytest.param({"restore_as": "x" * 201}, "INVALID_NAME", "restore_as", id="restore-as-too-long"),
        pytest.param({"overwrite": "always"}, "INVALID_ARGUMENT", "overwrite", id="bad-overwrite"),
        pytest.param({"disk_format": "vmdk"}, "INVALID_ARGUMENT", "disk_format", id="bad-disk-format"),
        pytest.param({"disk_dir": "images"}, "PATH_ESCAPE", "disk_dir", id="relative-disk-dir"),
        pytest.param({"disk_dir": "/var/lib/../tmp"}, "PATH_ESCAPE", "disk_dir", id="dotdot-disk-dir"),
        pytest.param({"disk_dir": "/"}, "PATH_ESCAPE", "disk_dir", id="root-disk-dir"),
        pytest.param({"disk_dir": "/srv/images", "storage_pool": "default"}, "INVALID_ARGUMENT", "disk_dir and storage_pool",
                     id="disk-dir-and-pool"),
        pytest.param({"network_map": {"prod": ""}}, "INVALID_ARGUMENT", "network_map", id="network-map-empty-name"),
        pytest.param({"network_map": {"prod": 3}}, "INVALID_ARGUMENT", "network_map", id="network-map-not-a-string"),
        pytest.param({"workers": 0}, "INVALID_ARGUMENT", "workers", id="workers-zero"),
        pytest.param({"workers": -2}, "INVALID_ARGUMENT", "workers", id="workers-negative"),
        pytest.param({"lock_timeout": -1}, "INVALID_ARGUMENT", "lock_timeout", id="negative-lock-timeout"),
        pytest.param({"repository": "relative/repo"}, "PATH_ESCAPE", "relative", id="relative-repository"),
        pytest.param({"repository": "/srv/../etc"}, "PATH_ESCAPE", "..", id="dotdot-repository"),
    ],
)
def test_validate_params_refuses(overrides, code, fragment):
    err = _raises(code, validate_params, _params(**overrides))
    assert fragment in err.msg


def test_validate_params_normalises():
    params = _params(name=None, uuid=OLD_UUID.upper(), repository="/srv//vmbackup/", disk_dir="/var//images/",
                     restore_as="x" * 200, workers=1, lock_timeout=0, network_map={"prod": "test"}, as_of="2026-11-25T07:00:00+01:00")
    assert validate_params(params) == "/srv/vmbackup"
    assert params.uuid == OLD_UUID
    assert params.disk_dir == "/var/images"


@pytest.mark.parametrize("restore_as", ["web01 copy", "web01-é", "-rf", "..a", "a..", "$(x)"])
def test_validate_params_accepts_names_libvirt_accepts(restore_as):
    validate_params(_params(restore_as=restore_as))


# --------------------------------------------------------------------------- stale_journals
def _journal(directory, token: str, data) -> str:
    path = os.path.join(directory, f"{JOURNAL_PREFIX}{token}.json")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    for _attempt in range(5):
        proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
        pid = int(proc.stdout)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
    raise AssertionError("every exited child's pid was reused at once")


def test_journal_of_a_dead_process_is_stale(tmp_path, dead_pid):
    data = {"pid": dead_pid, "phase": "writing", "temps": [str(tmp_path / ".x.partial-1")], "finals": [], "target": "t"}
    path = _journal(tmp_path, "dead", data)
    assert stale_journals(str(tmp_path)) == [(path, data)]


def test_journal_of_a_live_process_is_not_stale(tmp_path):
    _journal(tmp_path, "mine", {"pid": os.getpid(), "phase": "writing"})
    _journal(tmp_path, "parent", {"pid": os.getppid(), "phase": "defined"})
    assert stale_journals(str(tmp_path)) == []


def test_journal_of_a_process_of_another_user_is_not_stale(tmp_path, monkeypatch, dead_pid):
    def kill(_pid, _sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(_restore.os, "kill", kill)
    _journal(tmp_path, "other-user", {"pid": dead_pid})
    assert stale_journals(str(tmp_path)) == []


@pytest.mark.parametrize("pid", [None, 0, -1, "1234", 1.5, True])
def test_journal_without_a_usable_pid_is_stale(tmp_path, pid):
    data = {"phase": "writing"} if pid is None else {"pid": pid, "phase": "writing"}
    path = _journal(tmp_path, "odd", data)
    # bool is an int in Python: True is pid 1, which is alive.
    assert stale_journals(str(tmp_path)) == ([] if pid is True else [(path, data)])


def test_junk_is_ignored(tmp_path, dead_pid):
    stale = {"pid": dead_pid, "phase": "writing"}
    _journal(tmp_path, "garbage", "{not json")
    _journal(tmp_path, "empty", "")
    _journal(tmp_path, "list", [dead_pid])
    _journal(tmp_path, "number", "42")
    (tmp_path / f"{JOURNAL_PREFIX}dir.json").mkdir()
    (tmp_path / f"{JOURNAL_PREFIX}tmp.json.tmp-{dead_pid}").write_text(json.dumps(stale))
    (tmp_path / "vmbackup-restore-noprefix.json").write_text(json.dumps(stale))
    (tmp_path / f"{JOURNAL_PREFIX}nosuffix").write_text(json.dumps(stale))
    (tmp_path / "web01-vda-20261125T073512Z-001.qcow2").write_bytes(b"QFI\xfb")
    (tmp_path / f"{JOURNAL_PREFIX}target.json").write_text(json.dumps(stale))
    os.symlink(str(tmp_path / f"{JOURNAL_PREFIX}target.json"), str(tmp_path / f"{JOURNAL_PREFIX}link.json"))
    # Only the real file counts; the symlink to it does not.
    assert stale_journals(str(tmp_path)) == [(str(tmp_path / f"{JOURNAL_PREFIX}target.json"), stale)]


def test_stale_journals_are_sorted_and_a_missing_directory_has_none(tmp_path, dead_pid):
    paths = [_journal(tmp_path, token, {"pid": dead_pid, "n": i}) for i, token in enumerate(["c", "a", "b"])]
    assert [p for p, _data in stale_journals(str(tmp_path))] == sorted(paths)
    assert stale_journals(str(tmp_path / "missing")) == []


# =========================================================================== identity, live disks, network_map, names
# (issue 8 items 10-13, 15: the restore-identity work)
from ansible_collections.vmbackup.libvirt.plugins.module_utils._restore import (  # noqa: E402
    Existing,
    Identity,
    decide_identity,
    interface_macs,
    redact_xml,
    validate_name,
)

OTHER_UUID = "33333333-4444-4555-8666-777777777777"
POINT = SET_ID
OURS = {"vm_uuid": OLD_UUID, "set_id": POINT}


def _decide(requested="new", replace=False, existing=None, uuid_holder=None, target_name="web01-restored"):
    return decide_identity(source_uuid=OLD_UUID, source_name="web01", target_name=target_name, requested=requested,
                           replace=replace, point=POINT, existing=existing, uuid_holder=uuid_holder)


@pytest.mark.parametrize(
    "kwargs, kind, vm_uuid, macs, replacing",
    [
        pytest.param({}, "new", None, "new", False, id="new-name"),
        pytest.param({"replace": True}, "new", None, "new", False, id="replace-nothing-there-is-a-new-vm"),
        pytest.param({"replace": True, "existing": Existing(OLD_UUID, False, None, "shutoff")},
                     "source", OLD_UUID, "saved", True, id="replace-source"),
        pytest.param({"replace": True, "existing": Existing(OTHER_UUID, False, OURS, "shutoff")},
                     "target", OTHER_UUID, "target", True, id="replace-other"),
        pytest.param({"replace": True, "existing": Existing(OTHER_UUID, False, None, "shutoff")},
                     "target", OTHER_UUID, "target", True, id="replace-other-not-restored-by-us"),
        pytest.param({"requested": "original", "target_name": "web01"}, "original", OLD_UUID, "saved", False,
                     id="disaster-restore"),
        pytest.param({"existing": Existing(OTHER_UUID, False, OURS, "shutoff")}, "unchanged", OTHER_UUID, "saved", False,
                     id="already-restored"),
        pytest.param({"requested": "original", "target_name": "web01", "existing": Existing(OLD_UUID, False, OURS, "shutoff"),
                      "uuid_holder": "web01"}, "unchanged", OLD_UUID, "saved", False, id="disaster-restore-rerun"),
    ],
)
def test_identity_decision(kwargs, kind, vm_uuid, macs, replacing):
    identity = _decide(**kwargs)
    assert isinstance(identity, Identity)
    assert (identity.kind, identity.uuid, identity.macs, identity.replacing) == (kind, vm_uuid, macs, replacing)
    # Only the backed-up VM itself gets back its disks that were not restored.
    assert identity.new_identity is (kind != "source")
    assert identity.reason


@pytest.mark.parametrize(
    "kwargs, code, fragments",
    [
        pytest.param({"existing": Existing(OTHER_UUID, False, {"vm_uuid": OLD_UUID, "set_id": "20261124T000000Z-001"})},
                     "TARGET_VM_EXISTS", ["web01-restored", "overwrite=replace"], id="other-point-no-replace"),
        pytest.param({"existing": Existing(OTHER_UUID, False, {"vm_uuid": OTHER_UUID, "set_id": POINT})},
                     "TARGET_VM_EXISTS", ["web01-restored"], id="same-point-of-another-vm"),
        pytest.param({"replace": True, "existing": Existing(OTHER_UUID, True, None, "paused")},
                     "TARGET_VM_RUNNING", ["paused"], id="replace-running"),
        pytest.param({"requested": "original", "target_name": "web01", "existing": Existing(OLD_UUID, False, None, "shutoff"),
                      "uuid_holder": "web01"}, "TARGET_VM_EXISTS", ["named 'web01'", OLD_UUID], id="original-source-still-defined"),
        pytest.param({"requested": "original", "target_name": "web01", "existing": Existing(OTHER_UUID, False, OURS, "shutoff")},
                     "TARGET_VM_EXISTS", ["named 'web01'"], id="original-name-taken-by-a-copy"),
        pytest.param({"requested": "original", "target_name": "web01", "uuid_holder": "web01-renamed"},
                     "TARGET_VM_EXISTS", ["web01-renamed", OLD_UUID], id="original-uuid-in-use"),
    ],
)
def test_identity_decision_refuses(kwargs, code, fragments):
    err = _raises(code, _decide, **kwargs)
    for fragment in fragments:
        assert fragment in err.msg


def test_replacing_another_vm_keeps_its_macs_per_interface_and_no_unrestored_disk():
    """Item 10: a copy restored before is replaced: its own MACs, in interface order; the
    source's not-backed-up writable disk (vdc) is not attached."""
    own = ["52:54:00:bb:00:01", None, "52:54:00:bb:00:03"]
    root, dropped, _warnings = _restored(new_identity=True, macs=own)
    assert [[m.get("address") for m in i.findall("mac")] for i in root.findall("./devices/interface")] == \
        [[own[0]], [], [own[2]]]
    assert not set(MACS) & {m.get("address") for m in root.iter("mac")}
    assert dropped == ["vdc"] and _disk(root, "vdc") is None


def test_disaster_restore_carries_the_saved_macs_but_no_unrestored_disk():
    root, dropped, _warnings = _restored(name="web01", vm_uuid=OLD_UUID, new_identity=True, macs=interface_macs(SAVED_XML))
    assert [m.get("address") for m in root.findall("./devices/interface/mac")] == MACS
    assert root.findtext("uuid") == OLD_UUID and dropped == ["vdc"]


def test_fewer_macs_than_interfaces_leaves_the_rest_to_libvirt():
    root, _dropped, _warnings = _restored(macs=["52:54:00:bb:00:01"])
    assert [m.get("address") for m in root.findall("./devices/interface/mac")] == ["52:54:00:bb:00:01"]


def test_interface_macs():
    assert interface_macs(SAVED_XML) == MACS
    assert interface_macs("<domain><devices><interface type='user'/></devices></domain>") == [None]


LIVE_XML = SAVED_XML.replace("</devices>", """
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/hot.qcow2' index='3'/>
      <backingStore/>
      <target dev='vde' bus='virtio'/>
      <alias name='ua-vde'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x09' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/hot2.qcow2'/>
      <target dev='vdf' bus='virtio'/>
      <alias name='virtio-disk5'/>
    </disk>
  </devices>""")


def test_a_disk_attached_live_only_is_restored_from_the_live_xml():
    """Item 11: vde/vdf were backed up but are only in the running VM's XML."""
    disks = dict(BACKED_UP, vde=("/restore/vde.qcow2", "qcow2"), vdf=("/restore/vdf.qcow2", "raw"))
    root, dropped, warnings = _restored(disks=disks, live_xml=LIVE_XML)
    vde, vdf = _disk(root, "vde"), _disk(root, "vdf")
    assert [s.attrib for s in vde.findall("source")] == [{"file": "/restore/vde.qcow2"}]
    assert vde.find("backingStore") is None and vde.find("address") is None
    assert vde.find("alias").get("name") == "ua-vde", "a user alias stays"
    assert vdf.find("alias") is None, "libvirt's own alias goes"
    assert vdf.find("driver").get("type") == "raw"
    assert dropped == ["vdc"]
    assert sum("attached to the running VM only" in w for w in warnings) == 2


def test_a_backed_up_disk_found_nowhere_is_reported_dropped():
    disks = dict(BACKED_UP, vde=("/restore/vde.qcow2", "qcow2"))
    root, dropped, warnings = _restored(disks=disks)
    assert _disk(root, "vde") is None
    assert dropped == ["vdc", "vde"] and any("vde" in w and "not restored" in w for w in warnings)


@pytest.mark.parametrize(
    "network_map, unknown",
    [
        pytest.param({"prdo": "isolated"}, ["prdo"], id="typo"),
        pytest.param({"prod": "isolated", "br1": "x", "Prod": "y"}, ["Prod", "br1"], id="two-typos-one-good"),
    ],
)
def test_network_map_key_that_matches_nothing_fails(network_map, unknown):
    """Item 12: a typo must not leave the VM on the production network."""
    err = _raises("INVALID_ARGUMENT", _restored, network_map=network_map)
    assert err.details["unknown_keys"] == unknown
    for key in unknown:
        assert repr(key) in err.msg
    assert "network prod, bridge br0, network backup-net" in err.msg


def test_network_map_on_a_vm_without_interfaces_fails():
    err = _raises("INVALID_ARGUMENT", _restored, "<domain><name>x</name><devices/></domain>", disks={},
                  network_map={"prod": "x"})
    assert "no network or bridge interface" in err.msg


@pytest.mark.parametrize("value", ["a\x01b", "tab\there", "new\nline", "del\x7f", "x" * 201, "a/b", ".", "..", "", None, 3])
def test_validate_name_refuses(value):
    _raises("INVALID_NAME", validate_name, value, "restore_as")


@pytest.mark.parametrize(
    "overrides, code, fragment",
    [
        pytest.param({"restore_as": "web\x01copy"}, "INVALID_NAME", "control", id="restore-as-control"),
        pytest.param({"restore_as": "web\x7f"}, "INVALID_NAME", "control", id="restore-as-del"),
        pytest.param({"restore_as": "web\ncopy"}, "INVALID_NAME", "control", id="restore-as-newline"),
        pytest.param({"identity": "clone"}, "INVALID_ARGUMENT", "identity", id="bad-identity"),
        pytest.param({"identity": "original", "overwrite": "replace"}, "INVALID_ARGUMENT", "overwrite=replace",
                     id="original-and-replace"),
        pytest.param({"original_paths": True}, "INVALID_ARGUMENT", "identity=original", id="original-paths-new-identity"),
        pytest.param({"identity": "original", "original_paths": True, "disk_dir": "/srv/x"}, "INVALID_ARGUMENT",
                     "original_paths", id="original-paths-and-disk-dir"),
        pytest.param({"network_map": {"prod": "bad\x01"}}, "INVALID_ARGUMENT", "network_map", id="network-map-control"),
        pytest.param({"disk_dir": "/srv/im\x01ages"}, "PATH_ESCAPE", "control", id="disk-dir-control"),
    ],
)
def test_validate_params_refuses_identity_and_names(overrides, code, fragment):
    err = _raises(code, validate_params, _params(**overrides))
    assert fragment in err.msg


def test_a_marker_value_xml_cannot_carry_does_not_break_the_definition():
    """A manifest's VM name with a control character (restored under a valid restore_as)."""
    xml, _dropped, _warnings = restored_xml("<domain><name>x</name></domain>", name="y", vm_uuid=NEW_UUID, disks={},
                                            new_identity=True, network_map=None, nvram=None, metadata={"vm_name": "a\x01b"})
    assert restore_marker(xml) == {"vm_name": "a\ufffdb"}
    assert redact_xml(xml)


def test_redact_xml_masks_graphics_passwords():
    xml = "<domain><devices><graphics type='vnc' passwd='s3cret'/><graphics type='spice'/></devices></domain>"
    out = redact_xml(xml)
    assert "s3cret" not in out and "********" in out


FS_XML = """<domain><name>x</name><devices>
  <filesystem type='mount' accessmode='passthrough'><driver type='virtiofs'/><source dir='/srv/prod-data'/><target dir='data'/></filesystem>
  <filesystem type='mount'><source dir='/srv/iso'/><target dir='iso'/><readonly/></filesystem>
</devices></domain>"""


@pytest.mark.parametrize("new_identity, kept", [(True, ["iso"]), (False, ["data", "iso"])])
def test_a_read_write_shared_directory_is_not_given_to_a_copy(new_identity, kept):
    """The class of item 10: a copy must not write what the original VM writes."""
    root, _dropped, warnings = _restored(FS_XML, disks={}, new_identity=new_identity)
    assert [f.find("target").get("dir") for f in root.findall("./devices/filesystem")] == kept
    assert any("/srv/prod-data" in w for w in warnings) is new_identity


@pytest.mark.parametrize("path", [None, "relative/vda.qcow2", "/srv/../etc/vda", "/srv//vda.qcow2", "/dev/vg0/vda",
                                  "/srv/v\x01da", 3])
def test_original_paths_refuses_a_recorded_path_it_cannot_write(path):
    restorer = _restore.Restorer.__new__(_restore.Restorer)
    restorer.p = _params(identity="original", original_paths=True)
    err = _raises("INVALID_ARGUMENT", restorer._original_paths, {"disks": [{"target": "vda", "source": path}]})
    assert "original_paths" in err.msg


def test_original_paths_in_several_directories_are_refused(tmp_path):
    restorer = _restore.Restorer.__new__(_restore.Restorer)
    restorer.p = _params(identity="original", original_paths=True)
    disks = [{"target": "vda", "source": str(tmp_path / "a" / "vda.qcow2")}, {"target": "vdb", "source": str(tmp_path / "vdb.qcow2")}]
    err = _raises("INVALID_ARGUMENT", restorer._original_paths, {"disks": disks})
    assert "several directories" in err.msg


# --------------------------------------------------------------------------- journals: trust and what they may remove
TOKEN = "0123456789abcdef"


def _v2(phase="writing", files=None, token=TOKEN):
    return {"format": _restore.JOURNAL_FORMAT, "version": _restore.JOURNAL_VERSION, "token": token, "pid": 1,
            "phase": phase, "files": files if files is not None else []}


def _entry(directory="/d", final="vm-vda.qcow2", kind="file", dev=5, ino=7):
    return {"dir": directory, "final": final, "kind": kind, "dev": dev, "ino": ino}


@pytest.mark.parametrize("data, expected", [
    # writing: its partial always, its final only as the recorded inode
    (_v2(files=[_entry()]), [("/d/.vm-vda.qcow2.partial-" + TOKEN, "file", None), ("/d/vm-vda.qcow2", "file", (5, 7))]),
    # no inode recorded: the final name may be another restore's image
    (_v2(files=[_entry(dev=None, ino=None)]), [("/d/.vm-vda.qcow2.partial-" + TOKEN, "file", None)]),
    (_v2(files=[_entry(dev=True, ino=7)]), [("/d/.vm-vda.qcow2.partial-" + TOKEN, "file", None)]),
    (_v2(files=[_entry(dev="5", ino=7)]), [("/d/.vm-vda.qcow2.partial-" + TOKEN, "file", None)]),
    # defined: the work finished, only leftover partials go
    (_v2("defined", [_entry()]), [("/d/.vm-vda.qcow2.partial-" + TOKEN, "file", None)]),
    (_v2("odd", [_entry()]), [("/d/.vm-vda.qcow2.partial-" + TOKEN, "file", None)]),
    # allowed directories only, plain names only
    (_v2(files=[_entry(directory="/etc")]), []),
    (_v2(files=[_entry(final="../etc/passwd")]), []),
    (_v2(files=[_entry(final="..")]), []),
    (_v2(files=[_entry(final="")]), []),
    (_v2(files=[_entry(kind="link")]), []),
    (_v2(files=[_entry(directory="/n", final="x_VARS.fd")]), [("/n/.x_VARS.fd.partial-" + TOKEN, "file", None),
                                                              ("/n/x_VARS.fd", "file", (5, 7))]),
    (_v2(files=[_entry(directory="/n", final="uuid", kind="dir")]), [("/n/.uuid.partial-" + TOKEN, "dir", None),
                                                                     ("/n/uuid", "dir", (5, 7))]),
    # another token than the journal's own, another version, junk
    (_v2(files=[_entry()], token="ffffffffffffffff"), []),
    (dict(_v2(files=[_entry()]), version=3), []),
    (_v2(files=["x", None, 3]), []),
    ([1, 2], []),
    # format 1: only its own partial names, never a final
    ({"pid": 1, "phase": "writing",
      "temps": [f"/d/.vm-vda.qcow2.partial-{TOKEN}", "/d/victim.qcow2", f"/etc/.x.partial-{TOKEN}", f"/d/.partial-{TOKEN}",
                "/d/.y.partial-other", 5],
      "finals": ["/d/vm-vda.qcow2", "/d/victim.qcow2"]},
     [(f"/d/.vm-vda.qcow2.partial-{TOKEN}", "file", None)]),
])
def test_journal_victims(data, expected):
    victims = _restore.journal_victims(data, TOKEN, "/d", ["/n"])
    assert [(v.path, v.kind, v.inode) for v in victims] == expected


def test_journal_victims_need_a_real_token():
    assert _restore.journal_victims(_v2(files=[_entry()], token="x"), "x", "/d") == []


@pytest.mark.parametrize("name, token", [
    (f"{JOURNAL_PREFIX}{TOKEN}.json", TOKEN),
    (f"{JOURNAL_PREFIX}{TOKEN}.json.tmp-{TOKEN}", TOKEN),
    (f"{JOURNAL_PREFIX}{TOKEN}.json.tmp-1234", None),
    (f"{JOURNAL_PREFIX}dead.json", None),
    ("x.json", None),
])
def test_journal_token(name, token):
    assert _restore.journal_token(f"/d/{name}") == token


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@needs_root
def test_journal_of_another_user_is_not_trusted(tmp_path, dead_pid):
    path = _journal(tmp_path, "theirs", {"pid": dead_pid, "phase": "writing"})
    os.chown(path, 65534, 65534)
    ignored = []
    assert stale_journals(str(tmp_path), ignored=ignored) == []
    assert "uid 65534" in ignored[0]


@pytest.mark.parametrize("mode", [0o620, 0o602])
def test_journal_writable_by_others_is_not_trusted(tmp_path, dead_pid, mode):
    path = _journal(tmp_path, "open", {"pid": dead_pid, "phase": "writing"})
    os.chmod(path, mode)
    assert stale_journals(str(tmp_path)) == []


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_journals_in_a_directory_writable_by_others_are_not_trusted(tmp_path, dead_pid, mode):
    _journal(tmp_path, "mine", {"pid": dead_pid, "phase": "writing"})
    os.chmod(tmp_path, mode)
    ignored = []
    try:
        assert stale_journals(str(tmp_path), ignored=ignored) == []
    finally:
        os.chmod(tmp_path, 0o700)
    assert "directory" in ignored[0]


def test_journals_through_a_linked_directory_are_not_read(tmp_path, dead_pid):
    real = tmp_path / "real"
    real.mkdir()
    _journal(real, "mine", {"pid": dead_pid, "phase": "writing"})
    os.symlink(real, tmp_path / "link")
    assert stale_journals(str(tmp_path / "link")) == []
    assert len(stale_journals(str(real))) == 1


def test_a_temporary_journal_counts_only_without_its_journal(tmp_path, dead_pid):
    data = {"pid": dead_pid, "phase": "writing"}
    tmp = tmp_path / f"{JOURNAL_PREFIX}{TOKEN}.json.tmp-{TOKEN}"
    tmp.write_text(json.dumps(data))
    assert stale_journals(str(tmp_path)) == [(str(tmp), data)]
    main = _journal(tmp_path, TOKEN, data)
    assert stale_journals(str(tmp_path)) == [(main, data)]


def test_a_fifo_journal_does_not_block(tmp_path, dead_pid):
    os.mkfifo(tmp_path / f"{JOURNAL_PREFIX}fifo.json")
    assert stale_journals(str(tmp_path)) == []


# --------------------------------------------------------------------------- files: never through a link
def test_open_dir_refuses_a_link_anywhere_on_the_path(tmp_path):
    (tmp_path / "real" / "sub").mkdir(parents=True)
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.close(_restore.open_dir(str(tmp_path / "real" / "sub")))
    for path in (tmp_path / "link", tmp_path / "link" / "sub"):
        with pytest.raises(VmBackupError) as err:
            _restore.open_dir(str(path))
        assert err.value.error_code == "UNSAFE_TARGET" and err.value.details["unsafe_path"] == str(tmp_path / "link")


def test_open_dir_creates_only_the_last_component_with_its_mode(tmp_path):
    os.close(_restore.open_dir(str(tmp_path / "new"), create_mode=0o711))
    assert (tmp_path / "new").stat().st_mode & 0o7777 == 0o711
    with pytest.raises(FileNotFoundError):
        _restore.open_dir(str(tmp_path / "a" / "b"), create_mode=0o700)


def test_create_private_refuses_any_existing_name(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = _restore.create_private(fd, "new")
        assert (tmp_path / "new").stat().st_ino == st.st_ino and st.st_mode & 0o777 == 0o600
        target = tmp_path / "target"
        target.write_text("keep")
        os.symlink(target, tmp_path / "planted")
        for name in ("new", "planted"):
            with pytest.raises(FileExistsError):
                _restore.create_private(fd, name)
        assert target.read_text() == "keep"
    finally:
        os.close(fd)


@pytest.mark.parametrize("no_renameat2", [False, True])
def test_rename_never_replaces(tmp_path, monkeypatch, no_renameat2):
    if no_renameat2:
        def missing(*_args):
            raise OSError(_restore.errno.ENOSYS, "no renameat2")
        monkeypatch.setattr(_restore, "_renameat2", missing)
    (tmp_path / "src").write_text("new")
    (tmp_path / "dst").write_text("theirs")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(VmBackupError) as err:
            _restore.rename_noreplace(fd, "src", "dst", str(tmp_path / "dst"))
        assert err.value.error_code == "TARGET_PATH_EXISTS"
        assert (tmp_path / "dst").read_text() == "theirs" and (tmp_path / "src").read_text() == "new"
        _restore.rename_noreplace(fd, "src", "free", str(tmp_path / "free"))
        assert (tmp_path / "free").read_text() == "new" and not (tmp_path / "src").exists()
    finally:
        os.close(fd)


def test_remove_path_never_through_a_link(tmp_path):
    victim_dir = tmp_path / "victims"
    victim_dir.mkdir()
    (victim_dir / "a.qcow2").write_text("keep")
    os.symlink(victim_dir, tmp_path / "vm")
    os.symlink(victim_dir / "a.qcow2", tmp_path / "b.qcow2")
    done, reason = _restore.remove_path(str(tmp_path / "vm" / "a.qcow2"))
    assert not done and "symbolic link" in reason
    done, reason = _restore.remove_path(str(tmp_path / "b.qcow2"))
    assert not done and "not a regular file" in reason
    assert (victim_dir / "a.qcow2").read_text() == "keep" and os.path.islink(tmp_path / "b.qcow2")
    assert _restore.remove_path(str(tmp_path / "missing")) == (False, None)


def test_remove_path_checks_inode_and_use(tmp_path):
    path = tmp_path / "a.qcow2"
    path.write_text("x")
    st = path.stat()
    assert _restore.remove_path(str(path), inode=(st.st_dev, st.st_ino + 1)) == (False, "it is not the file this restore created (another inode)")
    os.link(path, tmp_path / "other-name")  # the same file under another name
    in_use = _restore.lv.InUse()
    in_use.add(str(tmp_path / "other-name"), "disk vda of domain 'b'")
    done, reason = _restore.remove_path(str(path), in_use=in_use)
    assert not done and "domain 'b'" in reason
    assert _restore.remove_path(str(path), inode=(st.st_dev, st.st_ino), in_use=_restore.lv.InUse()) == (True, None)
    assert not path.exists()


def test_in_use_unknown_chain_keeps_every_file_unless_ignored(tmp_path):
    mine = tmp_path / "mine.img"
    mine.write_text("x")
    named = tmp_path / "named.img"
    named.write_text("y")
    in_use = _restore.lv.InUse()
    in_use.add(str(named), "disk vda of domain 'b'")
    in_use.unknown.append("disk vda of domain 'broken' (/x.qcow2: not a qcow2)")
    # An unreadable chain may back any file: kept by default...
    assert "could not be read" in in_use.reason(str(mine), mine.lstat())
    # ...but a caller's own fresh file is kept only by a domain that names it.
    assert in_use.reason(str(mine), mine.lstat(), ignore_unknown=True) is None
    assert in_use.reason(str(named), named.lstat(), ignore_unknown=True) == "disk vda of domain 'b'"


# --------------------------------------------------------------------------- files in use
class _Dom:
    def __init__(self, name, inactive, live=None):
        self._name, self._inactive, self._live = name, inactive, live

    def UUIDString(self):  # noqa: N802 (libvirt's name)
        return f"00000000-0000-0000-0000-{abs(hash(self._name)) % 10**12:012d}"

    def name(self):
        return self._name

    def isActive(self):  # noqa: N802
        return self._live is not None

    def XMLDesc(self, flags):  # noqa: N802
        return self._inactive if flags else self._live


class _Conn:
    def __init__(self, doms):
        self.doms = doms

    def listAllDomains(self, _flags):  # noqa: N802
        return self.doms


def _dom_xml(*disks, nvram=None):
    body = "".join(f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{p}'/>"
                   f"<target dev='vd{chr(97 + i)}'/></disk>" for i, p in enumerate(disks))
    os_el = f"<os><nvram>{nvram}</nvram></os>" if nvram else "<os/>"
    return f"<domain><name>x</name>{os_el}<devices>{body}</devices></domain>"


@pytest.fixture
def libvirt_flags(monkeypatch):
    class _Flags:
        VIR_DOMAIN_XML_INACTIVE = 2
        libvirtError = RuntimeError
    monkeypatch.setattr(_restore.lv, "libvirt", _Flags)


def test_paths_in_use_follows_backing_chains_and_live_disks(tmp_path, libvirt_flags):
    files = {n: tmp_path / n for n in ("a.qcow2", "b.qcow2", "base.qcow2", "live.qcow2", "nv.fd", "free.qcow2")}
    for path in files.values():
        path.write_text("x")
    chains = {str(files["b.qcow2"]): [str(files["base.qcow2"])]}
    doms = [_Dom("A", _dom_xml(files["a.qcow2"], nvram=files["nv.fd"])),
            _Dom("B", _dom_xml(files["b.qcow2"]), live=_dom_xml(files["b.qcow2"], files["live.qcow2"]))]
    used = _restore.lv.paths_in_use(_Conn(doms), lambda path, fmt: chains.get(path, []))
    assert used.reason(str(files["a.qcow2"])) == "disk vda of domain 'A'"
    assert used.reason(str(files["nv.fd"])) == "nvram of domain 'A'"
    assert used.reason(str(files["base.qcow2"])) == "a backing file of disk vda of domain 'B'"
    assert used.reason(str(files["live.qcow2"])) == "disk vdb of domain 'B'"
    assert used.reason(str(files["free.qcow2"]), os.lstat(files["free.qcow2"])) is None
    # Through a link to a used file, by its inode.
    os.symlink(files["base.qcow2"], tmp_path / "alias.qcow2")
    used2 = _restore.lv.paths_in_use(_Conn([_Dom("C", _dom_xml(tmp_path / "alias.qcow2"))]))
    assert used2.reason(str(files["base.qcow2"]), os.lstat(files["base.qcow2"])) == "disk vda of domain 'C'"
    # Excluded: the domain being replaced.
    assert _restore.lv.paths_in_use(_Conn(doms), exclude_uuids=[doms[0].UUIDString()]).reason(str(files["a.qcow2"])) is None


def test_an_unreadable_backing_chain_keeps_everything(tmp_path, libvirt_flags):
    top = tmp_path / "top.qcow2"
    top.write_text("x")

    def unreadable(_path, _fmt):
        raise VmBackupError("BACKUP_FAILED", "qemu-img info failed")

    used = _restore.lv.paths_in_use(_Conn([_Dom("A", _dom_xml(top))]), unreadable)
    assert "could not be read" in used.reason(str(tmp_path / "anything.qcow2"))
    # A disk whose file is gone has no chain to protect.
    gone = _restore.lv.paths_in_use(_Conn([_Dom("A", _dom_xml(tmp_path / "gone.qcow2"))]), unreadable)
    assert gone.unknown == [] and gone.reason(str(tmp_path / "anything.qcow2")) is None


def test_a_pool_volume_counts_by_its_path(tmp_path, libvirt_flags):
    image = tmp_path / "vol.qcow2"
    image.write_text("x")

    class _Pool:
        def storageVolLookupByName(self, name):  # noqa: N802
            assert name == "vol.qcow2"
            return type("Vol", (), {"path": lambda _self: str(image)})()

    class _PoolConn(_Conn):
        def storagePoolLookupByName(self, name):  # noqa: N802
            assert name == "images"
            return _Pool()

    xml = ("<domain><name>v</name><devices><disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>"
           "<source pool='images' volume='vol.qcow2'/><target dev='vda'/></disk></devices></domain>")
    used = _restore.lv.paths_in_use(_PoolConn([_Dom("V", xml)]))
    assert used.reason(str(image)) == "disk vda of domain 'V'"


def test_journal_of_a_killed_unreaped_process_is_stale(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])  # pylint: disable=consider-using-with
    try:
        for _attempt in range(200):
            if _restore._proc_stat(proc.pid)[0] == "Z":
                break
            time.sleep(0.01)
        path = _journal(tmp_path, "zombie", {"pid": proc.pid, "phase": "writing"})
        assert [p for p, _d in stale_journals(str(tmp_path))] == [path]
    finally:
        proc.wait()


def test_journal_of_a_reused_pid_is_stale(tmp_path):
    start = _restore._proc_stat(os.getpid())[1]
    _journal(tmp_path, "mine", {"pid": os.getpid(), "started": start, "phase": "writing"})
    reused = _journal(tmp_path, "reused", {"pid": os.getpid(), "started": start + 1, "phase": "writing"})
    assert [p for p, _d in stale_journals(str(tmp_path))] == [reused]


# --------------------------------------------------------------------------- libvirt's directories behind an administrator's link
def test_open_dir_follows_only_links_root_alone_controls(tmp_path):
    (tmp_path / "srv" / "nvram").mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    os.symlink(tmp_path / "srv", tmp_path / "libvirt")  # root's link in root's directory: followed
    fd = _restore.open_dir(str(tmp_path / "libvirt" / "nvram"), follow_root_links=True)
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "srv" / "nvram"))
    finally:
        os.close(fd)
    with pytest.raises(VmBackupError):  # without the option every link is refused
        _restore.open_dir(str(tmp_path / "libvirt" / "nvram"))


@pytest.mark.parametrize("case", ["link-owned-by-another-user", "directory-others-can-write", "loop"])
def test_open_dir_refuses_links_others_control(tmp_path, case):
    (tmp_path / "srv").mkdir()
    where = tmp_path / "d"
    where.mkdir(mode=0o755)
    if case == "loop":
        os.symlink(where / "b", where / "a")
        os.symlink(where / "a", where / "b")
    else:
        os.symlink(tmp_path / "srv", where / "a")
    if case == "link-owned-by-another-user":
        os.lchown(where / "a", 65534, 65534)
    if case == "directory-others-can-write":
        os.chmod(where, 0o777)
    with pytest.raises(VmBackupError) as err:
        _restore.open_dir(str(where / "a"), follow_root_links=True)
    assert err.value.error_code == "UNSAFE_TARGET"


# ---------------------------------------------------------------------------------- O_DIRECT
def test_direct_io_is_used_where_the_file_opens_with_o_direct(tmp_path, monkeypatch):
    path = tmp_path / "image"
    path.write_bytes(b"")
    assert _restore.direct_io_works(str(path)) is True  # ext4 here
    assert _restore.direct_io_works(str(tmp_path / "missing")) is False
    os.symlink(path, tmp_path / "link")
    assert _restore.direct_io_works(str(tmp_path / "link")) is False
    real = os.open

    def no_direct(p, flags, *args, **kwargs):
        if flags & os.O_DIRECT:  # a file system without O_DIRECT (an old tmpfs, some FUSE file systems)
            raise OSError(22, "Invalid argument", p)
        return real(p, flags, *args, **kwargs)

    monkeypatch.setattr(_restore.os, "open", no_direct)
    assert _restore.direct_io_works(str(path)) is False
