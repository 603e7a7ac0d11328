# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for the pure parts of plugins/module_utils/_verify.py: file checks and parameters."""

from __future__ import annotations

import hashlib
import os

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._verify import (
    FileJob,
    VerifyParams,
    check_file,
    check_files,
    validate_params,
)

DATA = bytes(range(256)) * 4099  # not a multiple of the read chunk


def _job(path, size=len(DATA), digest=hashlib.sha256(DATA).hexdigest(), target="vda"):
    return FileJob("u", "20261125T000000Z-001", "disks/vda.qcow2", str(path), size, digest, target)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "vda.qcow2"
    path.write_bytes(DATA)
    return path


def test_a_sound_file_passes_and_counts_its_bytes(good):
    out = check_file(_job(good))
    assert (out.code, out.bytes_read) == (None, len(DATA))


@pytest.mark.parametrize(
    "damage, code",
    [
        (lambda p: p.unlink(), "FILE_MISSING"),
        (lambda p: p.write_bytes(DATA[:-1]), "SIZE_MISMATCH"),
        (lambda p: p.write_bytes(DATA + b"x"), "SIZE_MISMATCH"),
        (lambda p: p.write_bytes(b"\x01" + DATA[1:]), "CHECKSUM_MISMATCH"),
        (lambda p: p.write_bytes(DATA[:-1] + b"\x00"), "CHECKSUM_MISMATCH"),
        (lambda p: (p.unlink(), p.mkdir()), "FILE_MISSING"),
    ],
    ids=["deleted", "truncated", "grown", "first-byte", "last-byte", "directory"],
)
def test_each_kind_of_damage_has_its_code(good, damage, code):
    damage(good)
    out = check_file(_job(good))
    assert out.code == code
    assert "disks/vda.qcow2" in out.msg and "20261125T000000Z-001" in out.msg


def test_a_symlink_in_place_of_a_file_is_not_followed(good, tmp_path):
    link = tmp_path / "link.qcow2"
    os.symlink(good, link)
    assert check_file(_job(link)).code == "FILE_MISSING"


def test_parallel_checks_give_the_same_verdicts_as_serial(good, tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(DATA[:-1] + b"\x00")
    jobs = [_job(good), _job(bad), _job(tmp_path / "missing")]
    serial = sorted((o.job.path, o.code) for o in check_files(jobs, 1))
    parallel = sorted((o.job.path, o.code) for o in check_files(jobs, 3))
    assert serial == parallel
    assert [code for _p, code in serial].count(None) == 1


@pytest.mark.parametrize(
    "changes, code",
    [
        ({"repository": "relative/path"}, "PATH_ESCAPE"),
        ({"repository": "/srv/../etc"}, "PATH_ESCAPE"),
        ({"name": "a", "uuid": "2b9e5512-bd7e-46a8-afbf-89c9c8e8cdbc"}, "INVALID_ARGUMENT"),
        ({"name": ""}, "INVALID_NAME"),
        ({"uuid": "not-a-uuid"}, "INVALID_NAME"),
        ({"set_id": "20261125-001"}, "INVALID_NAME"),
        ({"set_id": "../20261125T000000Z-001"}, "INVALID_NAME"),
        ({"level": "deep"}, "INVALID_ARGUMENT"),
        ({"workers": 0}, "INVALID_ARGUMENT"),
        ({"lock_timeout": -1}, "INVALID_ARGUMENT"),
    ],
)
def test_bad_parameters_are_refused_with_a_code(changes, code):
    params = VerifyParams(**dict({"repository": "/srv/vmbackup"}, **changes))
    with pytest.raises(VmBackupError) as err:
        validate_params(params)
    assert err.value.error_code == code


def test_good_parameters_are_normalised():
    params = VerifyParams(repository="/srv//vmbackup/", uuid="2B9E5512BD7E46A8AFBF89C9C8E8CDBC", set_id="20261125T073512Z-001")
    assert validate_params(params) == "/srv/vmbackup"
    assert params.uuid == "2b9e5512-bd7e-46a8-afbf-89c9c8e8cdbc"
