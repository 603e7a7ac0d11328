# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for plugins/module_utils/_qemu_img.py with a fake runner (no qemu-img needed)."""

from __future__ import annotations

import json

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._qemu_img import QemuImg, chain_spec

BIN = "/usr/bin/qemu-img"
# A path a shell would split and execute; as one argv element it is just a file name.
NASTY = "/repo/a b; rm -rf ~ $(id) `x` 'q\".qcow2"


class FakeRun:
    """Stands in for AnsibleModule.run_command: records argv, returns a canned (rc, out, err)."""

    def __init__(self, rc: int = 0, out: str = "", err: str = "") -> None:
        self.result = (rc, out, err)
        self.calls: list = []

    def __call__(self, argv, *args, **kwargs):
        assert not args and not kwargs, "QemuImg must pass nothing but the argv (no use_unsafe_shell)"
        self.calls.append(argv)
        return self.result


# --------------------------------------------------------------------------- chain_spec


def _walk(node):
    files = []
    while node is not None:
        assert node["driver"] == "qcow2"
        assert node["file"]["driver"] == "file"
        assert set(node) == {"driver", "file", "backing"}
        files.append(node["file"]["filename"])
        node = node["backing"]
    return files


@pytest.mark.parametrize(
    "files",
    [
        pytest.param(["/r/full.qcow2"], id="one"),
        pytest.param(["/r/full.qcow2", "/r/inc1.qcow2"], id="two"),
        pytest.param(["/r/s1/vda.qcow2", "/r/s2/vda.qcow2", "/r/s3/vda.qcow2", "/r/s4/vda.qcow2"], id="four"),
        pytest.param([NASTY, "/r/ünïcode.qcow2", "/r/comma,colon:.qcow2"], id="odd-names"),
    ],
)
def test_chain_spec(files):
    spec = chain_spec(files)
    assert spec.startswith("json:")
    top = json.loads(spec[len("json:"):])
    # The top node is the last (newest) file; following "backing" leads back to the base.
    assert _walk(top) == list(reversed(files))
    assert top["file"]["filename"] == files[-1]


def test_chain_spec_base_has_null_backing():
    node = json.loads(chain_spec(["/r/base.qcow2"])[5:])
    assert "backing" in node and node["backing"] is None  # null: no backing file, not "use the header's"


def test_chain_spec_is_compact():
    spec = chain_spec(["/r/a.qcow2", "/r/b.qcow2"])
    assert ": " not in spec and ", " not in spec


def test_chain_spec_empty():
    with pytest.raises(ValueError):
        chain_spec([])


# --------------------------------------------------------------------------- QemuImg argv


INFO_ONE = json.dumps({"filename": "/r/a.qcow2", "format": "qcow2", "virtual-size": 1024, "actual-size": 200})
INFO_CHAIN = json.dumps(
    [
        {"filename": "/r/top.qcow2", "format": "qcow2", "actual-size": 4096},
        {"filename": "/r/mid.qcow2", "format": "qcow2", "actual-size": 1000},
        {"filename": "/r/base.raw", "format": "raw"},
    ]
)


@pytest.mark.parametrize(
    "call, out, argv",
    [
        pytest.param(lambda q: q.version(), "qemu-img version 8.2.2\n", [BIN, "--version"], id="version"),
        pytest.param(
            lambda q: q.info_chain("/r/a.qcow2", None, False),
            INFO_ONE,
            [BIN, "info", "--output=json", "--backing-chain", "/r/a.qcow2"],
            id="info-plain",
        ),
        pytest.param(
            lambda q: q.info_chain(NASTY, "qcow2", True),
            INFO_ONE,
            [BIN, "info", "--output=json", "--backing-chain", "-U", "-f", "qcow2", NASTY],
            id="info-force-share-format",
        ),
        pytest.param(
            lambda q: q.allocated_bytes("/dev/vg0/lv", "raw", False),
            "[]",
            [BIN, "map", "--output=json", "-f", "raw", "/dev/vg0/lv"],
            id="allocated-bytes",
        ),
        pytest.param(
            lambda q: q.allocated_bytes("/r/a.qcow2", "qcow2", True),
            "[]",
            [BIN, "map", "--output=json", "-U", "-f", "qcow2", "/r/a.qcow2"],
            id="allocated-bytes-force-share",
        ),
        pytest.param(
            lambda q: q.convert("/img/src.raw", "raw", NASTY),
            "",
            [BIN, "convert", "-q", "-W", "-m", "8", "-O", "qcow2", "-f", "raw", "/img/src.raw", NASTY],
            id="convert-with-source-format",
        ),
        pytest.param(
            lambda q: q.convert(NASTY, None, "/r/out.raw", "raw"),
            "",
            [BIN, "convert", "-q", "-W", "-m", "8", "-O", "raw", NASTY, "/r/out.raw"],
            id="convert-probing-source",
        ),
        pytest.param(
            lambda q: q.drop_backing_reference(NASTY),
            "",
            [BIN, "rebase", "-u", "-f", "qcow2", "-b", "", NASTY],
            id="rebase-unsafe-drop-backing",
        ),
    ],
)
def test_argv(call, out, argv):
    run = FakeRun(out=out)
    call(QemuImg(run, BIN))
    assert run.calls == [argv]
    (sent,) = run.calls
    assert isinstance(sent, list) and all(isinstance(a, str) for a in sent), "an argv list, never a shell string"


@pytest.mark.parametrize(
    "out, expected",
    [
        ("qemu-img version 8.2.2 (Debian 1:8.2.2+ds-0ubuntu1)\nCopyright (c) 2003-2023 Fabrice Bellard\n", "8.2.2 (Debian 1:8.2.2+ds-0ubuntu1)"),
        ("qemu-img version 6.2.0\n", "6.2.0"),
        ("", ""),
    ],
)
def test_version(out, expected):
    assert QemuImg(FakeRun(out=out), BIN).version() == expected


@pytest.mark.parametrize(
    "out, expected",
    [
        pytest.param(INFO_ONE, [json.loads(INFO_ONE)], id="single-object-is-wrapped"),
        pytest.param(INFO_CHAIN, json.loads(INFO_CHAIN), id="chain-list-kept-top-first"),
    ],
)
def test_info_chain(out, expected):
    assert QemuImg(FakeRun(out=out), BIN).info_chain("/r/a.qcow2", None, False) == expected


# qemu-img map of a compressed image: few host bytes, but 3 MiB of data that a backup writes.
MAP_COMPRESSED = json.dumps([
    {"start": 0, "length": 2097152, "depth": 0, "present": True, "zero": False, "data": True, "compressed": True},
    {"start": 2097152, "length": 1048576, "depth": 1, "present": True, "zero": False, "data": True, "offset": 327680},
    {"start": 3145728, "length": 1048576, "depth": 0, "present": True, "zero": True, "data": False},
    {"start": 4194304, "length": 62914560, "depth": 1, "present": False, "zero": True, "data": False},
])


@pytest.mark.parametrize("out, expected", [(MAP_COMPRESSED, 3 * 1048576), ("[]", 0)])
def test_allocated_bytes_counts_data_extents_of_the_whole_chain(out, expected):
    assert QemuImg(FakeRun(out=out), BIN).allocated_bytes("/r/a.qcow2", None, True) == expected


@pytest.mark.parametrize("out", ["not json", json.dumps({"a": 1})])
def test_map_without_an_extent_list_is_an_error(out):
    with pytest.raises(VmBackupError) as exc:
        QemuImg(FakeRun(out=out), BIN).allocated_bytes("/r/a.qcow2", None, True)
    assert exc.value.error_code == "BACKUP_FAILED"


# --------------------------------------------------------------------------- failures

CALLS = [
    pytest.param(lambda q: q.version(), id="version"),
    pytest.param(lambda q: q.info_chain("/r/a.qcow2", "qcow2", True), id="info"),
    pytest.param(lambda q: q.allocated_bytes("/r/a.qcow2", None, False), id="allocated-bytes"),
    pytest.param(lambda q: q.convert("/r/a.raw", "raw", "/r/b.qcow2"), id="convert"),
    pytest.param(lambda q: q.drop_backing_reference("/r/b.qcow2"), id="rebase"),
]


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(
    "rc, out, err, shown",
    [
        pytest.param(1, "", "qemu-img: Could not open '/r/a.qcow2': No such file\n", "Could not open '/r/a.qcow2'", id="stderr"),
        pytest.param(2, "  failure on stdout only \n", "", "failure on stdout only", id="stdout-when-stderr-empty"),
        pytest.param(-9, "out", "killed", "killed", id="signal"),
    ],
)
def test_failure_raises_backup_failed(call, rc, out, err, shown):
    run = FakeRun(rc, out, err)
    with pytest.raises(VmBackupError) as info:
        call(QemuImg(run, BIN))
    assert info.value.error_code == "BACKUP_FAILED"
    assert f"rc={rc}" in info.value.msg
    assert shown in info.value.msg
    assert info.value.msg.startswith("qemu-img ")
    assert len(run.calls) == 1


# --------------------------------------------------------------------------- bitmaps


def _info_with_bitmaps(bitmaps):
    data = {"compat": "1.1"}
    if bitmaps is not None:
        data["bitmaps"] = [{"name": n, "granularity": 65536, "flags": ["auto"]} for n in bitmaps]
    top = {"filename": "/r/a.qcow2", "format": "qcow2", "format-specific": {"type": "qcow2", "data": data}}
    base = {"filename": "/r/base.qcow2", "format": "qcow2", "format-specific": {"type": "qcow2", "data": {"bitmaps": [{"name": "base-only"}]}}}
    return json.dumps([top, base])


@pytest.mark.parametrize(
    "out, expected",
    [
        pytest.param(_info_with_bitmaps(["vmbackup-0123456789ab-1", "foreign"]), ["vmbackup-0123456789ab-1", "foreign"], id="two"),
        pytest.param(_info_with_bitmaps([]), [], id="empty-list"),
        pytest.param(_info_with_bitmaps(None), [], id="no-bitmaps-key"),
        pytest.param(json.dumps({"filename": "/r/a.qcow2", "format": "qcow2"}), [], id="no-format-specific"),
    ],
)
def test_bitmaps_of_the_top_image_only(out, expected):
    run = FakeRun(out=out)
    assert QemuImg(run, BIN).bitmaps("/r/a.qcow2") == expected
    assert run.calls == [[BIN, "info", "--output=json", "--backing-chain", "-f", "qcow2", "/r/a.qcow2"]]


def test_remove_bitmap_argv():
    run = FakeRun()
    QemuImg(run, BIN).remove_bitmap(NASTY, "vmbackup-0123456789ab-1")
    assert run.calls == [[BIN, "bitmap", "--remove", "-f", "qcow2", NASTY, "vmbackup-0123456789ab-1"]]


@pytest.mark.parametrize(
    "call",
    [pytest.param(lambda q: q.bitmaps("/r/a.qcow2"), id="bitmaps"), pytest.param(lambda q: q.remove_bitmap("/r/a.qcow2", "b"), id="remove")],
)
def test_bitmap_failures_raise_backup_failed(call):
    with pytest.raises(VmBackupError) as info:
        call(QemuImg(FakeRun(1, "", "qemu-img: Failed to get shared \"write\" lock"), BIN))
    assert info.value.error_code == "BACKUP_FAILED"
    assert 'shared "write" lock' in info.value.msg


# --------------------------------------------------------------------------- restore and verify reads


def test_convert_chain_writes_a_sparse_image_of_the_requested_format():
    run = FakeRun()
    spec = chain_spec(["/r/full.qcow2", NASTY])
    QemuImg(run, BIN).convert_chain(spec, "/images/out.img", "raw")
    assert run.calls == [[BIN, "convert", "-q", "-W", "-m", "8", "-O", "raw", spec, "/images/out.img"]]


def test_convert_chain_failure_is_restore_failed():
    with pytest.raises(VmBackupError) as err:
        QemuImg(FakeRun(1, err="No space left on device"), BIN).convert_chain("json:{}", "/x", "qcow2")
    assert err.value.error_code == "RESTORE_FAILED"
    assert "No space left on device" in err.value.msg


def test_read_all_reads_into_a_null_device_of_the_virtual_size():
    run = FakeRun()
    QemuImg(run, BIN).read_all("json:{}", 1 << 30)
    assert run.calls == [[BIN, "convert", "-n", "-m", "8", "--target-image-opts", "json:{}", "driver=null-co,size=1073741824"]]


def test_read_all_failure_is_image_invalid():
    with pytest.raises(VmBackupError) as err:
        QemuImg(FakeRun(1, err="Could not open backing"), BIN).read_all("json:{}", 10)
    assert err.value.error_code == "IMAGE_INVALID"


def test_run_raw_returns_rc_without_raising():
    run = FakeRun(2, out="{}", err="corrupt")
    assert QemuImg(run, BIN).run_raw(["check", NASTY]) == (2, "{}", "corrupt")
    assert run.calls == [[BIN, "check", NASTY]]


# --------------------------------------------------------------------------- pull mode: qemu-img over NBD
def test_nbd_image_opts_doubles_commas():
    from ansible_collections.vmbackup.libvirt.plugins.module_utils._qemu_img import nbd_image_opts
    assert nbd_image_opts("/run/a,b/nbd.sock", "vd,a") == "driver=nbd,server.type=unix,server.path=/run/a,,b/nbd.sock,export=vd,,a"


def _fake_qemu_img(tmp_path, body: str) -> str:
    path = tmp_path / "qemu-img"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_convert_nbd_reports_progress_and_passes_the_argv(tmp_path):
    log = tmp_path / "argv"
    binary = _fake_qemu_img(tmp_path, f'printf "%s\\n" "$@" > {log}\nprintf "    (0.00/100%%)\\r    (42.50/100%%)\\r"\n'
                                      'sleep 0.3\nprintf "    (100.00/100%%)\\r"\n')
    seen = []
    QemuImg(FakeRun(), binary).convert_nbd("/run/x/nbd.sock", "vda", "/stage/vda.qcow2", compress=True, on_progress=seen.append)
    assert seen and seen[-1] == 1.0 and 0.425 in seen
    argv = log.read_text().split("\n")[:-1]
    assert argv == ["convert", "-p", "-W", "-m", "8", "-O", "qcow2", "-c", "-o", "compression_type=zstd", "--image-opts",
                    "driver=nbd,server.type=unix,server.path=/run/x/nbd.sock,export=vda", "/stage/vda.qcow2"]


def test_convert_nbd_failure_is_a_transfer_failure(tmp_path):
    binary = _fake_qemu_img(tmp_path, 'echo "qemu-img: Could not open: No such file" >&2\nexit 1\n')
    with pytest.raises(VmBackupError) as info:
        QemuImg(FakeRun(), binary).convert_nbd("/run/x/nbd.sock", "vda", "/stage/vda.qcow2")
    assert info.value.error_code == "BACKUP_FAILED" and info.value.details["phase"] == "transfer"
    assert "No such file" in info.value.msg


def test_tied_child_dies_with_the_thread_that_started_it(tmp_path):
    import threading  # pylint: disable=import-outside-toplevel
    import time  # pylint: disable=import-outside-toplevel
    from ansible_collections.vmbackup.libvirt.plugins.module_utils._qemu_img import tied_popen
    box = []
    thread = threading.Thread(target=lambda: box.append(tied_popen(["sleep", "60"])))
    thread.start()
    thread.join()
    proc = box[0]
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.returncode == -9, "the child must get SIGKILL when its thread ends"
