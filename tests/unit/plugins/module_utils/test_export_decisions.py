# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for the pure decisions of plugins/module_utils/_export.py: periodic fulls, the
checkpoint each series keeps, and the economy for unchanged shut-off VMs."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import os

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _export
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _quiesce
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
SHA_XML = "1" * 64
SHA_NVRAM = "2" * 64


def chain(n: int, base_started: str = "2026-11-30T12:00:00Z") -> list[dict]:
    sets = [{"set_id": f"20261130T1200{i:02d}Z-001", "started": base_started if i == 0 else "2026-12-01T00:00:00Z"}
            for i in range(n)]
    return sets


@pytest.mark.parametrize("n, every_sets, every_days, started, want", [
    (1, None, None, "2026-11-01T00:00:00Z", None),
    (3, 4, None, "2026-11-30T12:00:00Z", None),
    (4, 4, None, "2026-11-30T12:00:00Z", "the chain of set 20261130T120003Z-001 has 4 sets (full_every_sets=4)"),
    (5, 4, None, "2026-11-30T12:00:00Z", "the chain of set 20261130T120004Z-001 has 5 sets (full_every_sets=4)"),
    (1, 1, None, "2026-11-30T12:00:00Z", "the chain of set 20261130T120000Z-001 has 1 sets (full_every_sets=1)"),
    # exactly one day old is not "more than" a day
    (2, None, 1, "2026-11-30T12:00:00Z", None),
    (2, None, 1, "2026-11-30T11:59:59Z", "the full 20261130T120000Z-001 of the chain started 1.0 days ago (full_every_days=1)"),
    (2, None, 0.5, "2026-11-30T12:00:00Z", "the full 20261130T120000Z-001 of the chain started 1.0 days ago (full_every_days=0.5)"),
    # a full dated after the clock (skew) never triggers the days rule
    (2, None, 1, "2026-12-05T00:00:00Z", None),
    # the sets rule is named first when both apply
    (4, 4, 1, "2026-11-01T00:00:00Z", "the chain of set 20261130T120003Z-001 has 4 sets (full_every_sets=4)"),
    (3, 4, 7, "2026-11-01T00:00:00Z", "the full 20261130T120000Z-001 of the chain started 30.5 days ago (full_every_days=7)"),
])
def test_periodic_full_reason(n, every_sets, every_days, started, want):
    assert _export.periodic_full_reason(chain(n, started), NOW, every_sets, every_days) == want


def _m(set_id: str, series: str | None, checkpoint: str | None) -> dict:
    m = {"set_id": set_id, "checkpoint": checkpoint}
    if series is not None:
        m["series"] = series
    return m


@pytest.mark.parametrize("manifests, want", [
    ([], {}),
    ([_m("a", None, "cp-a"), _m("b", None, "cp-b")], {"default": "cp-b"}),
    # absent series is default; each series keeps its own newest
    ([_m("a", None, "cp-a"), _m("b", "weekly", "cp-b"), _m("c", "monthly", "cp-c"), _m("d", "weekly", "cp-d")],
     {"default": "cp-a", "weekly": "cp-d", "monthly": "cp-c"}),
    # a newest copy (no checkpoint) keeps none of its series: the one before it is retired
    ([_m("a", "weekly", "cp-a"), _m("b", "weekly", None)], {}),
    ([_m("a", "weekly", "cp-a"), _m("b", "monthly", None), _m("c", "weekly", None), _m("d", "monthly", "cp-d")],
     {"monthly": "cp-d"}),
    ([_m("a", "weekly", None)], {}),
])
def test_series_checkpoints(manifests, want):
    assert _export.series_checkpoints(manifests) == want


def _image(path="/img/top.qcow2", **over) -> dict:
    return dict({"path": path, "size": 1000, "mtime_ns": 10, "ctime_ns": 20, "ino": 7, "dev": 2049}, **over)


def _copy_set(**over) -> dict:
    m = {
        "set_id": "20261201T000000Z-001", "type": "copy",
        "disks": [{"target": "vda", "format": "qcow2", "virtual_size": 64, "method": "copy",
                   "images": [_image(), _image("/img/base.qcow2", ino=8)]}],
        "files": {"domain.xml": {"sha256": SHA_XML, "size": 1, "role": "domain_xml"},
                  "disks/vda.qcow2": {"sha256": "3" * 64, "size": 1, "role": "disk"},
                  "nvram.fd": {"sha256": SHA_NVRAM, "size": 1, "role": "nvram"}},
    }
    m.update(over)
    return m


def _now(**over) -> _export.OfflineState:
    state = _export.OfflineState(
        domain_xml_sha256=SHA_XML,
        disks={"vda": {"format": "qcow2", "virtual_size": 64, "images": [_image(), _image("/img/base.qcow2", ino=8)]}},
        firmware={"nvram.fd": SHA_NVRAM},
    )
    for key, value in over.items():
        setattr(state, key, value)
    return state


def _edit_disk(**over):
    def edit(m):
        m["disks"][0].update(over)
    return edit


def _edit_image(index, **over):
    def edit(state):
        state.disks["vda"]["images"][index].update(over)
    return edit


@pytest.mark.parametrize("edit_set, edit_now, verdict, want", [
    (None, None, None, None),
    (None, None, {"outcome": "ok"}, None),
    (None, None, {"outcome": "failed"}, "the last verify of set 20261201T000000Z-001 did not pass (failed)"),
    (None, None, {"outcome": "unreadable"}, "did not pass (unreadable)"),
    (lambda m: m.update(type="full"), None, None, "was taken from the running VM (full)"),
    (_edit_disk(images=None), None, None, "recorded no file state for disk vda"),
    (_edit_disk(images=[{"path": "/img/top.qcow2"}]), None, None, "recorded no file state for disk vda"),
    (_edit_disk(images=[_image(size=True)]), None, None, "recorded no file state for disk vda"),
    (_edit_disk(images=[_image(size="1000")]), None, None, "recorded no file state for disk vda"),
    (_edit_disk(images=[dict(_image(), extra=1)]), None, None, "recorded no file state for disk vda"),
    (_edit_disk(images=[]), None, None, "recorded no file state for disk vda"),
    (None, lambda s: s.disks["vda"].update(images=None), None, "disk vda is not a chain of regular image files"),
    (None, lambda s: s.disks.update(vdb=dict(s.disks["vda"])), None, "the disks changed"),
    (None, lambda s: s.disks["vda"].update(virtual_size=128), None, "disk vda changed format or size"),
    (None, lambda s: s.disks["vda"].update(format="raw"), None, "disk vda changed format or size"),
    (None, lambda s: s.disks["vda"]["images"].pop(), None, "the image chain of disk vda changed"),
    (None, _edit_image(0, path="/img/other.qcow2"), None, "the image chain of disk vda changed"),
    (None, _edit_image(0, size=1001), None, "image /img/top.qcow2 of disk vda changed since set 20261201T000000Z-001 (size)"),
    (None, _edit_image(0, mtime_ns=11), None, "(mtime_ns)"),
    (None, _edit_image(0, ctime_ns=21), None, "(ctime_ns)"),
    (None, _edit_image(0, ino=9), None, "(ino)"),
    (None, _edit_image(0, dev=1), None, "(dev)"),
    (None, _edit_image(1, mtime_ns=11, ctime_ns=21), None,
     "image /img/base.qcow2 of disk vda changed since set 20261201T000000Z-001 (mtime_ns, ctime_ns)"),
    (None, lambda s: setattr(s, "domain_xml_sha256", "f" * 64), None, "the domain XML changed"),
    (None, lambda s: setattr(s, "firmware", None), None, "is a link or not a regular file"),
    (None, lambda s: setattr(s, "firmware", {}), None, "the NVRAM or TPM state changed"),
    (None, lambda s: setattr(s, "firmware", {"nvram.fd": "9" * 64}), None, "the NVRAM or TPM state changed"),
    (None, lambda s: s.firmware.update({"tpm/tpm2-00.permall": "8" * 64}), None, "the NVRAM or TPM state changed"),
])
def test_unchanged_since(edit_set, edit_now, verdict, want):
    manifest, now = _copy_set(), _now()
    manifest["disks"][0]["images"] = copy.deepcopy(manifest["disks"][0]["images"])
    if edit_set:
        edit_set(manifest)
    if edit_now:
        edit_now(now)
    got = _export.unchanged_since(manifest, verdict, now)
    if want is None:
        assert got is None
    else:
        assert got is not None and want in got, got


@pytest.mark.parametrize("chain_info, want", [
    ([{"filename": "/a/top.qcow2"}, {"filename": "/a/base.qcow2"}], ["/a/top.qcow2", "/a/base.qcow2"]),
    ([{"filename": "/dev/sdb"}], ["/dev/sdb"]),  # a block device is refused by image_state, not here
    ([{"filename": "nbd://host/export"}], None),
    ([{"filename": "json:{\"driver\":\"file\"}"}], None),
    ([{"filename": "relative.qcow2"}], None),
    ([{"filename": "/a/top.qcow2", "format-specific": {"type": "qcow2", "data": {"data-file": "/a/data.raw"}}}], None),
    ([{}], None),
    ([], None),
])
def test_chain_files(chain_info, want):
    assert _export.chain_files(chain_info) == want


def test_image_state_only_for_regular_files(tmp_path):
    img = tmp_path / "vda.qcow2"
    img.write_bytes(b"x" * 10)
    st = img.stat()
    want = {"path": str(img), "size": 10, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino, "dev": st.st_dev}
    assert _export.image_state(str(img)) == want
    assert _export.image_state(str(tmp_path)) is None
    assert _export.image_state(str(tmp_path / "missing")) is None
    assert _export.image_state("/dev/null") is None
    assert _export.chain_states([str(img), "/dev/null"]) is None
    assert _export.chain_states(None) is None
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for fstype, trusted in (("ext4", True), ("xfs", True), ("nfs4", False), ("fuse.sshfs", False), ("cifs", False)):
        info = tmp_path / f"mountinfo-{fstype}"
        info.write_text(f"22 27 0:21 / /proc rw - proc proc rw\n36 27 {dev} / /var rw,relatime - {fstype} /dev/x rw\n")
        want = [_export.image_state(str(img))] if trusted else None
        assert _export.chain_states([str(img)], str(info)) == want, fstype
    # no mount shows the file's device, or no mountinfo at all: in doubt, not trusted
    (tmp_path / "other").write_text("36 27 254:99 / /var rw - ext4 /dev/x rw\n")
    assert _export.chain_states([str(img)], str(tmp_path / "other")) is None
    assert _export.chain_states([str(img)], str(tmp_path / "none")) is None


@pytest.mark.parametrize("line, want", [
    ("36 27 8:1 / /srv rw,relatime shared:1 - ext4 /dev/sda1 rw", "ext4"),
    ("37 27 0:50 / /mnt/nfs rw - nfs4 host:/export rw,vers=4.2", "nfs4"),
    ("38 27 8:2 /sub /bind rw - xfs /dev/sda2 rw", "xfs"),
    ("39 27 8:3 / /x rw", None),
])
def test_fs_type_of_dev(line, want):
    major, minor = (int(x) for x in line.split()[2].split(":"))
    assert _export.fs_type_of_dev(os.makedev(major, minor), line + "\n") == want


@pytest.mark.parametrize("mtime_ns, ctime_ns, racy", [
    (0, 0, False),
    (8_999_999_999, 0, False),
    (9_000_000_001, 0, True),
    (0, 9_500_000_000, True),
    (0, 11_000_000_000, True),  # a time after the recording (clock stepped back) is racy too
])
def test_is_racy(mtime_ns, ctime_ns, racy):
    assert _export.is_racy([_image(mtime_ns=mtime_ns, ctime_ns=ctime_ns)], 10_000_000_000) is racy


def test_sha256_regular_at_never_follows_a_link(tmp_path):
    (tmp_path / "nvram").write_bytes(b"efi vars")
    os.symlink(tmp_path / "nvram", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert _export.sha256_regular_at(fd, "nvram") == hashlib.sha256(b"efi vars").hexdigest()
        assert _export.sha256_regular_at(fd, "link") is False
        assert _export.sha256_regular_at(fd, "fifo") is False
        assert _export.sha256_regular_at(fd, "missing") is None
    finally:
        os.close(fd)


@pytest.mark.parametrize("over, code", [
    ({"series": "Weekly"}, "INVALID_NAME"),
    ({"series": ""}, "INVALID_NAME"),
    ({"series": "a" * 33}, "INVALID_NAME"),
    ({"full_every_sets": 0}, "INVALID_ARGUMENT"),
    ({"full_every_sets": -3}, "INVALID_ARGUMENT"),
    ({"full_every_days": 0.0}, "INVALID_ARGUMENT"),
    ({"full_every_days": -1.0}, "INVALID_ARGUMENT"),
    ({"full_every_days": float("nan")}, "INVALID_ARGUMENT"),
    ({"full_every_days": float("inf")}, "INVALID_ARGUMENT"),
    ({"full_every_days": 1e9}, "INVALID_ARGUMENT"),
    ({"quiesce": "always"}, "INVALID_ARGUMENT"),
    ({"quiesce_timeout": 0.0}, "INVALID_ARGUMENT"),
    ({"quiesce_timeout": -5.0}, "INVALID_ARGUMENT"),
    ({"quiesce_timeout": float("nan")}, "INVALID_ARGUMENT"),
    ({"quiesce_timeout": 601.0}, "INVALID_ARGUMENT"),
])
def test_bad_series_and_periodic_options_fail_before_any_work(over, code):
    params = _export.ExportParams(repository="/srv/vmbackup", name="web01", **over)
    with pytest.raises(VmBackupError) as info:
        _export.validate_params(params)
    assert info.value.error_code == code, info.value.msg


@pytest.mark.parametrize("over", [
    {}, {"series": "weekly"}, {"series": "off-site_2"}, {"full_every_sets": 1}, {"full_every_days": 0.25},
    {"full_every_days": 365.0, "full_every_sets": 12},
    {"quiesce": "required", "quiesce_timeout": 0.5}, {"quiesce": "never"}, {"quiesce_timeout": 600.0},
])
def test_good_series_and_periodic_options(over):
    params = _export.ExportParams(repository="/srv/vmbackup", name="web01", **over)
    assert _export.validate_params(params) == "/srv/vmbackup"


@pytest.mark.parametrize("policy, consistency, reason, warned", [
    ("auto", "application", None, False),
    ("auto", "crash", "the guest agent is not connected or does not answer: x", True),
    ("auto", "crash", "the guest did not freeze within quiesce_timeout (2s)", True),
    ("auto", "crash", "the VM has no guest agent channel (org.qemu.guest_agent.0)", False),  # a deliberate setup
    ("never", "crash", "quiesce=never", False),
])
def test_quiesce_fallback_warns_only_for_an_anomaly(policy, consistency, reason, warned):
    exporter = _export.Exporter(_export.ExportParams(repository="/srv/vmbackup", name="web01", quiesce=policy),
                                run=None, qemu_img_path="qemu-img", check_mode=False)
    quiesce = _quiesce.Quiesce(policy, consistency=consistency, reason=reason, thawed_leftover=False)
    exporter._note_quiesce(quiesce)  # pylint: disable=protected-access
    assert bool(exporter.warnings) is warned
    assert not exporter.cleaned and quiesce.thawed_leftover is False
    exporter._thawed = True  # pylint: disable=protected-access
    exporter._note_quiesce(quiesce)  # pylint: disable=protected-access
    assert quiesce.thawed_leftover is True


# ---------------------------------------------------------------------- transport (issue 13)
@pytest.mark.parametrize("transport, nbd_error, used, warns", [
    ("auto", None, "pull", False),
    ("auto", "ImportError: No module named 'nbd'", "push", True),
    ("pull", "ImportError", "pull", False),
    ("push", None, "push", False),
])
def test_resolve_transport(transport, nbd_error, used, warns):
    got, warning = _export.resolve_transport(transport, nbd_error)
    assert got == used and bool(warning) is warns
    if warning:
        assert "python3-libnbd" in warning


@pytest.mark.parametrize("set_type, methods, ok", [
    ("full", ["full", "full"], True),
    ("incremental", ["full"], True),  # only raw disks: read in full
    ("incremental", ["incremental", "full"], False),
])
def test_pull_without_libnbd_takes_fulls_only(set_type, methods, ok):
    assert _export.pull_full_without_nbd(set_type, methods) is ok


@pytest.mark.parametrize("paths, dirs, inside", [
    (["/run/a/nbd.sock", "/run/a/vda.scratch"], ["/run/a"], True),
    (["/run/a/nbd.sock", "/run/b/vda.scratch"], ["/run/a", "/run/b"], True),
    (["/run/a/nbd.sock", "/elsewhere/vda.scratch"], ["/run/a"], False),
    (["/run/ab/nbd.sock"], ["/run/a"], False),
    (["/run/a/../b/nbd.sock"], ["/run/a"], False),
    ([], ["/run/a"], False),
])
def test_inside_any(paths, dirs, inside):
    assert _export.inside_any(paths, dirs) is inside


def test_pid_alive():
    assert _export.pid_alive(os.getpid())
    import subprocess  # pylint: disable=import-outside-toplevel
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not _export.pid_alive(proc.pid)


@pytest.mark.parametrize("over, fragment", [
    ({"transport": "nbd"}, "transport"),
    ({"compress": "gzip"}, "compress"),
    ({"scratch_dir": "rel"}, "scratch_dir"),
    ({"scratch_dir": "/" + "s" * 40}, "too long"),
])
def test_validate_params_transport_options(over, fragment):
    params = _export.ExportParams(repository="/srv/repo", name="vm", **over)
    with pytest.raises(VmBackupError) as info:
        _export.validate_params(params)
    assert info.value.error_code == "INVALID_ARGUMENT" and fragment in info.value.msg


def test_the_default_scratch_dir_fits_a_unix_socket_path():
    params = _export.ExportParams(repository="/srv/repo", name="vm")
    _export.validate_params(params)
    assert params.scratch_dir == _export.DEFAULT_SCRATCH_DIR
