"""health_check with the tiny real guest: the agent answers, a probe's exit code and output, a
probe that hangs, the agent stopped in the guest, a VM without an agent channel, a VM that does
not run, check mode, bad input. What the probe did is read back in the guest through another
path (the harness's own guest-exec), and the VM is checked to be as it was (XML, state)."""

from __future__ import annotations

import json
import os
import signal
import time
import xml.etree.ElementTree as ET

import libvirt

from guest import AGENT_CHANNEL
from harness import expect_error, module_pids, wait_for


def expect_ok(result: dict) -> dict:
    """A passing health check: never a change."""
    assert not result["failed"] and result["changed"] is False, json.dumps(result, indent=1)[:4000]
    return result


def _without_agent_channel(conn, guest) -> None:
    """Redefine a shut-off guest without the agent's virtio-serial channel (same name and UUID)."""
    root = ET.fromstring(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    devices = root.find("devices")
    for channel in devices.findall("channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            devices.remove(channel)
    guest.dom = conn.defineXML(ET.tostring(root, encoding="unicode"))


def _as_found(dom) -> tuple:
    return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), dom.state()[0], dom.ID()


def test_health_check(ansible, conn, guests):
    guest = guests.create()
    bare = guests.create(agent=False, running=False)
    _without_agent_channel(conn, bare)
    bare.start()  # agent=False: returns when /init answers on the control port
    guest.write_file("/data/marker", b"written before the check\n")
    before = _as_found(guest.dom)

    # Agent answers; the probe runs in the guest (its side effect read back through the harness's own guest-exec).
    r = expect_ok(ansible("health_check", {"name": guest.name, "probe": ["sh", "-c", "cat /data/marker; echo ran > /data/probe-ran"],
                                           "probe_expect_stdout": "written before"}))
    assert r["changed"] is False and r["healthy"] is True and r["agent_channel"] is True
    assert [(c["name"], c["outcome"]) for c in r["checks"]] == [("running", "ok"), ("agent", "ok"), ("probe", "ok")]
    assert r["probe"]["rc"] == 0 and r["probe"]["stdout"] == "written before the check\n"
    assert guest.read_file("/data/probe-ran") == b"ran\n"
    assert r["vm"] == {"name": guest.name, "uuid": guest.uuid, "state": "running"}

    # Check mode: the checks it would run, nothing run in the guest.
    r = expect_ok(ansible("health_check", {"uuid": guest.uuid, "probe": ["touch", "/data/check-mode"]}, check=True))
    assert r["healthy"] is None and r["probe"] is None
    assert [c["outcome"] for c in r["checks"]] == ["skipped"] * 3 and all(c["detail"].startswith("check mode") for c in r["checks"])
    assert guest.exec(["test", "-e", "/data/check-mode"])[0] == 1

    # The probe's exit code: the expected one passes, another fails naming the check.
    expect_ok(ansible("health_check", {"name": guest.name, "probe": ["sh", "-c", "exit 3"], "probe_expect_rc": 3}))
    r = expect_error(ansible("health_check", {"name": guest.name, "probe": ["sh", "-c", "echo oops >&2; exit 3"]}), "HEALTH_CHECK_FAILED")
    assert r["failed_check"] == "probe" and r["healthy"] is False and r["probe"]["rc"] == 3 and "oops" in r["probe"]["stderr"]
    assert [c["outcome"] for c in r["checks"]] == ["ok", "ok", "failed"]
    r = expect_error(ansible("health_check", {"name": guest.name, "probe": ["cat", "/data/marker"], "probe_expect_stdout": "absent"}),
                     "HEALTH_CHECK_FAILED")
    assert r["failed_check"] == "probe" and "does not contain" in r["msg"]
    r = expect_error(ansible("health_check", {"name": guest.name, "probe": ["/no/such/program"]}), "HEALTH_CHECK_FAILED")
    assert r["probe"]["rc"] is None and "refused" in r["probe"]["error"]

    # A probe that hangs: killed in the guest after probe_timeout.
    start = time.monotonic()
    r = expect_error(ansible("health_check", {"name": guest.name, "probe": ["sleep", "600"], "probe_timeout": 2}), "HEALTH_CHECK_FAILED")
    assert 2 <= r["probe"]["seconds"] < 10 and time.monotonic() - start < 20 and "did not end" in r["probe"]["error"]
    assert b"sleep 600" not in guest.sh("ps -o args 2>/dev/null || ps")

    # A cancel (AWX: SIGTERM) while the probe runs: CANCELLED, and the probe does not run on in the guest.
    pending = ansible.popen_result("health_check", {"name": guest.name, "probe": ["sleep", "601"], "probe_timeout": 300})
    wait_for(lambda: b"sleep 601" in guest.sh("ps -o args 2>/dev/null || ps"), 30, what="the probe running in the guest")
    for pid in wait_for(lambda: module_pids(pending.proc, "health_check"), 10, what="the module's process"):
        os.kill(pid, signal.SIGTERM)
    r = expect_error(pending.result(60), "CANCELLED")
    assert b"sleep 601" not in guest.sh("ps -o args 2>/dev/null || ps")

    # The agent stopped in the guest: AGENT_UNAVAILABLE after the timeout; agent=never does not ask it.
    guest.stop_agent()
    start = time.monotonic()
    r = expect_error(ansible("health_check", {"name": guest.name, "timeout": 3}), "AGENT_UNAVAILABLE")
    assert r["failed_check"] == "agent" and r["checks"][0]["outcome"] == "ok" and r["checks"][1]["outcome"] == "failed"
    assert r["checks"][1]["seconds"] >= 2.5 and time.monotonic() - start < 20 and "not connected" in r["msg"]
    r = expect_ok(ansible("health_check", {"name": guest.name, "agent": "never"}))
    assert [(c["name"], c["outcome"]) for c in r["checks"]] == [("running", "ok"), ("agent", "skipped")]
    guest.start_agent()
    assert _as_found(guest.dom) == before  # read-only: definition, state and domain id as they were

    # No agent channel: skipped under auto, a failure under required or with a probe.
    r = expect_ok(ansible("health_check", {"name": bare.name}))
    assert r["agent_channel"] is False and r["checks"][1]["outcome"] == "skipped" and "no guest agent channel" in r["checks"][1]["detail"]
    r = expect_error(ansible("health_check", {"name": bare.name, "agent": "required", "timeout": 30}), "AGENT_UNAVAILABLE")
    assert r["failed_check"] == "agent" and r["checks"][1]["seconds"] < 5
    r = expect_error(ansible("health_check", {"name": bare.name, "probe": ["true"]}), "AGENT_UNAVAILABLE")
    assert r["failed_check"] == "probe"

    # A VM that does not run: waited for up to the timeout, then HEALTH_CHECK_FAILED.
    bare.destroy()
    r = expect_error(ansible("health_check", {"name": bare.name, "timeout": 2}), "HEALTH_CHECK_FAILED")
    assert r["failed_check"] == "running" and r["checks"][0]["seconds"] >= 1.5 and r["vm"]["state"] == "shutoff"
    r = expect_ok(ansible("health_check", {"name": bare.name, "running": False}))
    assert [c["outcome"] for c in r["checks"]] == ["skipped", "skipped"]

    # Bad input: before any check, with an error code.
    for args, code in (({"name": guest.name, "timeout": 0}, "INVALID_ARGUMENT"),
                       ({"name": guest.name, "probe": []}, "INVALID_ARGUMENT"),
                       ({"name": guest.name, "probe_expect_rc": 256, "probe": ["true"]}, "INVALID_ARGUMENT"),
                       ({"name": guest.name, "probe_expect_stdout": "x"}, "INVALID_ARGUMENT"),
                       ({"uuid": "not-a-uuid"}, "INVALID_NAME"),
                       ({"name": "vmbt-no-such-vm"}, "VM_NOT_FOUND")):
        r = expect_error(ansible("health_check", args), code)
        assert "checks" not in r
