# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""plugins/module_utils/_errors.py: the error type, and the codes documented in docs/error-codes.md."""

from __future__ import annotations

import pathlib
import re

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import ERROR_CODES, VmBackupError

# tests/unit/plugins/module_utils/<this file> -> the collection root
ERROR_DOC = pathlib.Path(__file__).resolve().parents[4] / "docs" / "error-codes.md"
_CODE_ROW = re.compile(r"^\| `([A-Z][A-Z0-9_]*)` \|")


@pytest.fixture(scope="module")
def doc_rows() -> list[str]:
    if not ERROR_DOC.is_file():
        pytest.fail(f"{ERROR_DOC} does not exist; it must document every code in ERROR_CODES")
    return ERROR_DOC.read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_code_is_documented(doc_rows, code):
    rows = [line for line in doc_rows if line.startswith(f"| `{code}` |")]
    assert len(rows) == 1, f"docs/error-codes.md needs exactly one table row starting with '| `{code}` |', found {len(rows)}"


def test_documented_codes_exist(doc_rows):
    documented = [m.group(1) for m in map(_CODE_ROW.match, doc_rows) if m]
    assert documented, "no '| `CODE` |' rows found"
    assert sorted(set(documented) - set(ERROR_CODES)) == [], "codes documented but not in ERROR_CODES"


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_code_shape(code):
    assert re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*", code)
    assert isinstance(ERROR_CODES[code], str) and ERROR_CODES[code].strip()


@pytest.mark.parametrize("code", ["", "NOT_A_CODE", "vm_locked", "VM_LOCKED ", " VM_LOCKED", "Vm_Locked", None])
def test_unknown_code_is_a_programming_error(code):
    with pytest.raises(ValueError, match="unknown error code"):
        raise VmBackupError(code, "message")


@pytest.mark.parametrize(
    "code, msg, details",
    [
        ("VM_LOCKED", "locked by pid 42", {"lock_path": "/r/vms/u/lock", "lock_holder": {"pid": 42}}),
        ("CHECKSUM_MISMATCH", "sha256 differs", {"set_id": "20261125T073512Z-001", "file": "disks/vda.qcow2"}),
        ("IO_ERROR", "disk full", {}),
    ],
)
def test_to_result(code, msg, details):
    err = VmBackupError(code, msg, **details)
    assert isinstance(err, Exception)
    assert str(err) == msg
    assert (err.error_code, err.msg, err.details) == (code, msg, details)
    result = err.to_result()
    assert result == dict(details, msg=msg, error_code=code)
    result["extra"] = 1
    assert "extra" not in err.details, "to_result returns a copy"
    assert "extra" not in err.to_result()


def test_raise_and_catch():
    with pytest.raises(VmBackupError) as info:
        raise VmBackupError("SET_NOT_FOUND", "no set", set_id="x")
    assert info.value.to_result() == {"msg": "no set", "error_code": "SET_NOT_FOUND", "set_id": "x"}
