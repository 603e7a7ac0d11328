"""The pure parts of _guest: which health checks run (agent auto/required/never), the probe's
verdict, and the options refused before any check."""

from __future__ import annotations

import base64
import math

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _guest
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError


def params(**kw) -> _guest.HealthParams:
    kw.setdefault("name", "web01")
    return _guest.HealthParams(**kw)


@pytest.mark.parametrize("agent, channel, running, probe, expected", [
    ("auto", True, True, None, [("running", True), ("agent", True)]),
    ("auto", False, True, None, [("running", True), ("agent", False)]),
    ("required", False, True, None, [("running", True), ("agent", True)]),
    ("never", True, True, None, [("running", True), ("agent", False)]),
    ("auto", True, False, ["true"], [("running", False), ("agent", True), ("probe", True)]),
    ("auto", False, True, ["true"], [("running", True), ("agent", False), ("probe", True)]),
])
def test_plan_checks(agent, channel, running, probe, expected):
    plan = _guest.plan_checks(params(agent=agent, running=running, probe=probe), channel)
    assert [(c["name"], c["run"]) for c in plan] == expected
    if agent == "auto" and not channel:
        assert "no guest agent channel" in plan[1]["detail"]


@pytest.mark.parametrize("outcome, expect_rc, expect_stdout, ok", [
    ({"rc": 0, "stdout": "up\n", "stderr": "", "error": None}, 0, None, True),
    ({"rc": 0, "stdout": "up\n", "stderr": "", "error": None}, 0, "up", True),
    ({"rc": 0, "stdout": "down\n", "stderr": "", "error": None}, 0, "up", False),
    ({"rc": 3, "stdout": "", "stderr": "bad", "error": None}, 0, None, False),
    ({"rc": 3, "stdout": "", "stderr": "", "error": None}, 3, None, True),
    ({"rc": None, "stdout": "", "stderr": "", "error": "sleep did not end within 2s"}, 0, None, False),
])
def test_probe_verdict(outcome, expect_rc, expect_stdout, ok):
    why = _guest.probe_verdict(params(probe=["x"], probe_expect_rc=expect_rc, probe_expect_stdout=expect_stdout), outcome)
    assert (why is None) is ok
    if outcome["error"]:
        assert why == outcome["error"]
    elif outcome["rc"] != expect_rc:
        assert f"exit code {outcome['rc']}" in why and (outcome["stderr"] in why)


@pytest.mark.parametrize("kw, code", [
    ({"name": None}, "INVALID_ARGUMENT"),
    ({"uuid": "6f1c7a52-3a6e-4b53-9c39-4d1f2b7c8e01"}, "INVALID_ARGUMENT"),  # and name: both
    ({"name": ""}, "INVALID_NAME"),
    ({"name": None, "uuid": "nope"}, "INVALID_NAME"),
    ({"agent": "sometimes"}, "INVALID_ARGUMENT"),
    ({"timeout": 0}, "INVALID_ARGUMENT"),
    ({"timeout": -1}, "INVALID_ARGUMENT"),
    ({"timeout": math.nan}, "INVALID_ARGUMENT"),
    ({"timeout": math.inf}, "INVALID_ARGUMENT"),
    ({"timeout": 3601}, "INVALID_ARGUMENT"),
    ({"probe_timeout": 0}, "INVALID_ARGUMENT"),
    ({"probe": []}, "INVALID_ARGUMENT"),
    ({"probe": [""]}, "INVALID_ARGUMENT"),
    ({"probe": ["cat", "a\x00b"]}, "INVALID_ARGUMENT"),
    ({"probe": ["true"], "agent": "never"}, "INVALID_ARGUMENT"),
    ({"probe": ["true"], "probe_expect_rc": 256}, "INVALID_ARGUMENT"),
    ({"probe": ["true"], "probe_expect_rc": -1}, "INVALID_ARGUMENT"),
    ({"probe_expect_stdout": "x"}, "INVALID_ARGUMENT"),
])
def test_bad_params(kw, code):
    with pytest.raises(VmBackupError) as info:
        _guest.validate_health_params(params(**kw))
    assert info.value.error_code == code


def test_good_params_normalised():
    p = params(name=None, uuid=" 6F1C7A52-3A6E-4B53-9C39-4D1F2B7C8E01 ", timeout=5, probe=["true"], probe_expect_rc=255)
    _guest.validate_health_params(p)
    assert p.uuid == "6f1c7a52-3a6e-4b53-9c39-4d1f2b7c8e01" and p.timeout == 5.0


def test_output_capped():
    text, cut = _guest._decode(base64.b64encode(b"a" * (_guest.MAX_OUTPUT + 10)).decode(), False)
    assert len(text) == _guest.MAX_OUTPUT and cut
    assert _guest._decode(None, False) == ("", False)
    assert _guest._decode(base64.b64encode(b"\xff ok").decode(), True) == ("\ufffd ok", True)


@pytest.mark.parametrize("code, message, unreachable", [
    (_guest._quiesce.VIR_ERR_AGENT_UNRESPONSIVE, "QEMU guest agent is not connected", True),
    (_guest._quiesce.VIR_ERR_ARGUMENT_UNSUPPORTED, "QEMU guest agent is not configured", True),
    (_guest._quiesce.VIR_ERR_OPERATION_INVALID, "domain is not running", True),
    (1, "Guest agent command failed, error was 'Failed to execute child process'", False),
])
def test_unreachable(code, message, unreachable):
    assert _guest._unreachable(code, message) is unreachable


def test_exec_command_refuses_bad_argv():
    for argv in ([], [""], ["ls", 3]):
        with pytest.raises(VmBackupError) as info:
            _guest.exec_command(None, argv, 5)
        assert info.value.error_code == "INVALID_ARGUMENT"
    with pytest.raises(VmBackupError):
        _guest.exec_command(None, ["cat"], 5, input=b"x" * (_guest.MAX_INPUT + 1))
