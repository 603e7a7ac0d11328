"""The pure parts of _quiesce (policy, reasons, deadline, marker verdicts) and the marker file and
guard process on the real file system and a real interpreter (no libvirt daemon)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _quiesce as qz
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

UUID = "0f6b4b6e-3f57-4a59-9d7a-1c2b3d4e5f60"


@pytest.mark.parametrize("policy, timeout", [("auto", 10), ("required", 0.5), ("never", 600), ("auto", 10.0)])
def test_validate_accepts(policy, timeout):
    assert qz.validate(policy, timeout) == (policy, float(timeout))


@pytest.mark.parametrize("policy, timeout", [
    ("always", 10), ("", 10), (None, 10), ("AUTO", 10),
    ("auto", 0), ("auto", -1), ("auto", 600.5), ("auto", math.nan), ("auto", math.inf), ("auto", True), ("auto", "5"),
])
def test_validate_refuses(policy, timeout):
    with pytest.raises(VmBackupError) as err:
        qz.validate(policy, timeout)
    assert err.value.error_code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("policy, state, reason, fails", [
    ("never", "running", "quiesce=never", False),
    ("auto", "running", None, False),
    ("required", "blocked", None, False),
    ("auto", "shutoff", "the VM is shutoff: no guest runs to be quiesced", False),
    ("required", "shutoff", "the VM is shutoff: no guest runs to be quiesced", False),
    ("required", "crashed", "the VM is crashed: no guest runs to be quiesced", False),
    ("auto", "paused", "the VM is paused: its guest agent cannot answer", True),
    ("required", "pmsuspended", "the VM is pmsuspended: its guest agent cannot answer", True),
    ("never", "paused", "quiesce=never", False),
])
def test_skip_reason(policy, state, reason, fails):
    assert qz.skip_reason(policy, state) == (reason, fails)


@pytest.mark.parametrize("code, message, start", [
    (74, "argument unsupported: QEMU guest agent is not configured", "the VM has no guest agent channel"),
    (86, "Guest agent is not responding: QEMU guest agent is not connected", "the guest agent is not connected or does not answer"),
    (86, "Guest agent is not responding: Guest agent not available for now", "the guest agent is not connected or does not answer"),
    (84, "Operation not supported: the command guest-fsfreeze-freeze has been disabled", "the guest agent cannot freeze"),
    (55, "Requested operation is not valid: domain is not running", "the VM cannot be quiesced now"),
    (68, "Timed out during operation: cannot acquire state change lock", "libvirt is busy"),
    (1, "internal error: unable to execute QEMU agent command 'guest-fsfreeze-freeze': failed to freeze /data", "the guest agent failed to freeze"),
    (None, "", "the guest agent failed to freeze"),
])
def test_describe_error(code, message, start):
    text = qz.describe_error(code, message)
    assert text.startswith(start)
    assert message.strip() in text


@pytest.mark.parametrize("code, message, maybe", [
    (74, "QEMU guest agent is not configured", False),
    (86, "Guest agent is not responding: QEMU guest agent is not connected", False),
    (86, "Guest agent is not responding: Guest agent not available for now", True),  # a timeout: may freeze late
    (84, "disabled", False),
    (3, "no support", False),
    (55, "domain is not running", False),
    (1, "failed to freeze /data", True),
    (68, "cannot acquire state change lock", True),
])
def test_may_have_frozen(code, message, maybe):
    assert qz.may_have_frozen(code, message) is maybe


@pytest.mark.parametrize("marker, active, dom_id, verdict", [
    (None, True, 7, "none"),
    ({}, True, 7, "none"),
    ({"dom_id": 7, "pid": 1}, True, 7, "thaw"),
    ({"dom_id": 7}, False, -1, "stale"),  # the VM stopped since: no guest is frozen
    ({"dom_id": 6}, True, 7, "stale"),  # the VM was restarted since
    ({"unreadable": True}, True, 7, "stale"),  # garbled: no domain id to trust, nothing to thaw by it
])
def test_marker_verdict(marker, active, dom_id, verdict):
    assert qz.marker_verdict(marker, active, dom_id) == verdict


@pytest.mark.parametrize("requested, taken, timeout, ok", [
    (100.0, 100.4, 10.0, True),
    (100.0, 110.0, 10.0, True),
    (100.0, 110.01, 10.0, False),
    (100.0, 100.6, 0.5, False),
])
def test_within_deadline(requested, taken, timeout, ok):
    assert qz.within_deadline(requested, taken, timeout) is ok


def test_public_rounds_and_has_every_key():
    q = qz.Quiesce("auto", consistency="application", frozen=True, frozen_seconds=0.123456, freeze_seconds=0.0204,
                   filesystems=2)
    assert q.public() == {"policy": "auto", "consistency": "application", "frozen": True, "frozen_seconds": 0.123,
                          "freeze_seconds": 0.02, "filesystems": 2, "reason": None, "thawed_leftover": False}
    assert set(qz.Quiesce("never").public()) == set(q.public())


@pytest.mark.parametrize("reason, expected", [
    ("the VM has no guest agent channel (org.qemu.guest_agent.0): x", True),
    ("the guest agent is not connected or does not answer: x", False),
    (None, False),
])
def test_no_agent_channel(reason, expected):
    assert qz.no_agent_channel(reason) is expected


# ---------------------------------------------------------------------- the marker on a real file system
def test_marker_round_trip_and_lock_excludes_a_second_holder(tmp_path):
    directory = str(tmp_path / "state")
    first = qz.Marker(UUID, directory)
    assert first.open(create=False) is False  # nothing there: a leftover check creates nothing
    assert not os.path.exists(directory)
    assert first.open(create=True)
    assert oct(os.stat(directory).st_mode & 0o777) == "0o700"
    assert oct(os.stat(first.path).st_mode & 0o777) == "0o600"
    assert first.lock(0)
    first.write({"dom_id": 3, "pid": os.getpid()})
    # A second holder (another run, another process) cannot take it while the first holds it.
    code = ("import fcntl, sys; fd = open(sys.argv[1], 'rb');\n"
            "try:\n fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('locked')\n"
            "except OSError: print('busy')")
    assert subprocess.run([sys.executable, "-c", code, first.path], capture_output=True, text=True, check=True).stdout.strip() == "busy"
    second = qz.Marker(UUID, directory)
    assert second.open(create=False)
    assert second.read() == {"dom_id": 3, "pid": os.getpid()}
    first.close()  # the holder's death drops the flock as well
    assert second.lock(0)
    second.write(None)
    assert second.read() is None
    second.close()


def test_marker_refuses_a_symlink_and_an_unsafe_directory(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    (directory / f"freeze-{UUID}").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(VmBackupError) as err:
        qz.Marker(UUID, str(directory)).open(create=True)
    assert err.value.error_code == "UNSAFE_TARGET"
    assert not (tmp_path / "elsewhere").exists()
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(VmBackupError) as err:
        qz.Marker(UUID, str(open_dir)).open(create=False)
    assert err.value.error_code == "UNSAFE_TARGET"


def test_marker_garbled_content_reads_as_filled(tmp_path):
    marker = qz.Marker(UUID, str(tmp_path / "s"))
    marker.open(create=True)
    os.pwrite(marker.fd, b"{not json", 0)
    assert marker.read() == {"unreadable": True}
    marker.close()


# ---------------------------------------------------------------------- the guard's source
def test_guard_source_compiles():
    compile(qz.GUARD_SOURCE, "<guard>", "exec")


@pytest.mark.parametrize("xml, expected", [
    ("<domain><devices><channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></domain>", True),
    ("<domain><devices><channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel></devices></domain>", False),
    ("<domain><devices><disk/></devices></domain>", False),
    ("not xml", True),  # in doubt: ask libvirt
])
def test_has_agent_channel(xml, expected):
    assert qz.has_agent_channel(xml) is expected


NO_CHANNEL_XML = "<domain><devices/></domain>"


class FakeDom:
    """Stands in for a libvirt domain only where no daemon is involved (state and XML)."""

    def __init__(self, state=1, xml=NO_CHANNEL_XML):
        self._state = state
        self._xml = xml

    def state(self):
        return self._state, 0

    def XMLDesc(self, flags=0):  # noqa: N802  (libvirt's name)
        return self._xml


def test_predict_shutoff_and_never_need_no_agent():
    assert qz.predict(FakeDom(5), "required").public()["reason"] == "the VM is shutoff: no guest runs to be quiesced"
    assert qz.predict(FakeDom(1), "never").consistency == "crash"


def test_predict_paused_required_fails_before_any_agent_call():
    with pytest.raises(VmBackupError) as err:
        qz.predict(FakeDom(3), "required")
    assert err.value.error_code == "QUIESCE_FAILED"
    assert err.value.details["quiesce"]["reason"] == "the VM is paused: its guest agent cannot answer"


def test_frozen_never_touches_nothing(tmp_path):
    started = time.monotonic()
    with qz.frozen(FakeDom(1), "never", 5, "qemu:///system", directory=str(tmp_path / "s")) as q:
        pass
    assert q.consistency == "crash" and not q.frozen and q.reason == "quiesce=never"
    assert not (tmp_path / "s").exists() and time.monotonic() - started < 1


def test_no_channel_auto_falls_back_without_a_guard_or_a_marker(tmp_path):
    with qz.frozen(FakeDom(1), "auto", 5, "qemu:///system", directory=str(tmp_path / "s")) as q:
        pass
    assert q.consistency == "crash" and qz.no_agent_channel(q.reason) and q.freeze_seconds is None
    assert not (tmp_path / "s").exists()


def test_no_channel_required_fails_in_predict_and_frozen(tmp_path):
    for call in (lambda: qz.predict(FakeDom(1), "required"),
                 lambda: qz.frozen(FakeDom(1), "required", 5, "qemu:///system", directory=str(tmp_path)).__enter__()):
        with pytest.raises(VmBackupError) as err:
            call()
        assert err.value.error_code == "QUIESCE_FAILED" and qz.NO_CHANNEL in err.value.msg
