"""vmbackup.libvirt.domain_info against the real libvirtd: every domain, the metadata element set
with `virsh metadata` exactly as the module documents it, and the selection rules."""

from __future__ import annotations

import uuid
from xml.sax import saxutils

import libvirt
import pytest

from harness import PREFIX, URI, run

NS = "https://vmbackup.libvirt/schema/1"


def virsh_metadata(name: str, xml: str, *flags: str) -> None:
    """The documented command, run for real."""
    run(["virsh", "-c", URI, "metadata", name, NS, "--key", "vmbackup", *flags, "--set", xml])


@pytest.fixture
def transient(conn):
    name = f"{PREFIX}tr-{uuid.uuid4().hex[:8]}"
    xml = (f"<domain type='qemu'><name>{saxutils.escape(name)}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>"
           "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices/></domain>")
    dom = conn.createXML(xml, 0)
    yield dom
    try:
        dom.destroy()
    except libvirt.libvirtError:
        pass


def test_lists_domains_with_metadata_and_applies_the_selection_rules(ansible, vms, conn, transient):
    token = uuid.uuid4().hex[:6]
    running = vms.create(name=f"{PREFIX}di-{token}-run")
    stopped = vms.create(name=f"{PREFIX}di-{token}-off", running=False)
    optout = vms.create(name=f"{PREFIX}di-{token}-optout")
    gold = vms.create(name=f"{PREFIX}di-{token}-gold", running=False)
    bad = vms.create(name=f"{PREFIX}di-{token}-bad", running=False)
    # A running VM opted out in its persistent definition only (--config): the module reads that.
    virsh_metadata(optout.name, '<backup enabled="no" tier="gold"/>', "--config")
    virsh_metadata(gold.name, '<backup tier="gold"/>', "--config")
    virsh_metadata(bad.name, '<backup enabled="perhaps"/>', "--config")
    # The live definition of the running VM does not carry it (libvirt keeps the two apart).
    with pytest.raises(libvirt.libvirtError):
        optout.dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    mine = f"{PREFIX}di-{token}-*"
    result = ansible("domain_info", {"include": [mine, transient.name(), f"{PREFIX}nomatch-{token}*"]})
    assert not result["failed"] and not result["changed"], result
    by_name = {d["name"]: d for d in result["domains"]}
    # Every domain of the host is listed (other tests add and remove theirs meanwhile: check ours).
    assert {running.name, stopped.name, optout.name, gold.name, bad.name, transient.name()} <= set(by_name)
    run_entry = by_name[running.name]
    assert run_entry["uuid"] == running.uuid and run_entry["state"] == "running" and run_entry["active"]
    assert run_entry["persistent"] and not run_entry["autostart"]
    assert run_entry["disks"] == [{"target": "vda", "device": "disk", "source": str(running.disks["vda"]), "source_type": "file",
                                   "format": "qcow2", "readonly": False, "backup": True, "skip_reason": None}]
    assert by_name[stopped.name]["state"] == "shutoff" and not by_name[stopped.name]["active"]
    assert by_name[optout.name]["metadata"] == {"present": True, "enabled": False, "tier": "gold", "quiesce": None, "error": None,
                                                "xml": '<backup enabled="no" tier="gold"/>'}
    assert by_name[gold.name]["tier"] == "gold" and by_name[running.name]["tier"] == "default"
    assert not by_name[transient.name()]["persistent"]

    assert result["selected"] == sorted([running.name, stopped.name, gold.name, bad.name])
    reasons = {d["name"]: d["reason"] for d in result["domains"]}
    assert "opted out" in reasons[optout.name]
    assert "transient" in reasons[transient.name()]
    assert "metadata is malformed" in reasons[bad.name]
    assert result["unmatched_patterns"] == [f"{PREFIX}nomatch-{token}*"]
    assert "perhaps" in by_name[bad.name]["metadata"]["error"]
    assert {e["name"] for e in result["not_selected"]} >= {optout.name, transient.name()}

    # Tiers, opt-in, shut-off and transient switches; exclude wins over include.
    result = ansible("domain_info", {"include": [mine], "tiers": ["gold"]})
    assert result["selected"] == [gold.name], result["selected"]
    virsh_metadata(running.name, '<backup enabled="yes"/>', "--config", "--live")
    result = ansible("domain_info", {"include": [mine], "require_opt_in": True})
    assert result["selected"] == [running.name]
    result = ansible("domain_info", {"include": [mine], "include_shutoff": False, "exclude": ["*-run"]})
    assert result["selected"] == []
    result = ansible("domain_info", {"include": [transient.name()], "include_transient": True})
    assert result["selected"] == [transient.name()]

    # Read only: the definitions are as they were.
    for vm in (running, stopped, optout, gold):
        assert vm.dom.isActive() == (vm in (running, optout))


def test_unreachable_libvirt_is_an_error_code(ansible):
    result = ansible("domain_info", {"uri": "qemu+unix:///system?socket=/nonexistent/libvirt-sock"})
    assert result["failed"] and result["error_code"] == "LIBVIRT_UNAVAILABLE", result
    assert "Traceback" not in result.get("msg", "")


def test_bad_pattern_is_refused(ansible):
    result = ansible("domain_info", {"include": ["a\nb"]})
    assert result["failed"] and result["error_code"] == "INVALID_ARGUMENT", result
