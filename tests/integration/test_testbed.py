"""The multi-host test bed itself (scripts/testbed.sh, tests/integration/testbed.py): its hosts are
separate hypervisors reached over SSH, share /srv/vmbackup, and its faults (libvirtd stopped, SSH
blocked) are real and undone; `down` leaves nothing. Every claim is checked by a second path:
a libvirt connection straight to the host's libvirtd, the host's files through /proc/<pid>/root,
commands inside the host's namespaces, the root libvirtd. Other multi-host tests build on these facts."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import libvirt
import pytest

from guest import GuestFactory, disk_read_file
from testbed import Testbed, _try_lock

SMOKE = """
- name: Bed smoke
  hosts: hypervisors
  gather_facts: false
  tasks:
    - name: Hostname
      ansible.builtin.command: hostname
      changed_when: false
      register: hn
    - name: Mark the shared directory
      ansible.builtin.copy:
        dest: "/srv/vmbackup/{{ inventory_hostname }}"
        content: "{{ hn.stdout }}"
        mode: "0600"
    - name: Domains
      vmbackup.libvirt.domain_info:
"""


def _domain_names(play, host):
    (res,) = [r for _task, _h, r in play.results(task="Domains", host=host)]
    return {d["name"]: d["uuid"] for d in res["domains"]}


def test_bed_hosts_are_separate_hypervisors_reached_over_ssh(testbed: Testbed, conn, tmp_path):
    bed = testbed
    assert bed.hosts == ["hv1", "hv2", "hv3"]
    shared = bed.fresh_repo()
    st = shared.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o711)
    pids = {h: bed.hosts_info[h]["pid"] for h in bed.hosts}

    # each host: its own hostname, networks (the isolated one only), an empty libvirtd
    for host in bed.hosts:
        assert bed.run(host, ["hostname"]).stdout.strip() == host
        hconn = bed.connect(host)
        assert hconn.getHostname() == host
        nets = {n.name(): n for n in hconn.listAllNetworks()}
        assert sorted(nets) == ["vmbackup-isolated"]
        assert nets["vmbackup-isolated"].isActive()
        xml = nets["vmbackup-isolated"].XMLDesc()
        assert "<forward" not in xml and "<ip" not in xml
        assert bed.path(host, "/srv/vmbackup").stat().st_ino == shared.stat().st_ino
        assert bed.path(host, "/srv/vmbackup").stat().st_dev == shared.stat().st_dev

    # the same domain name on hv1 and hv2, both running, both with id 1, so cgroup or run-directory
    # paths named after id+name would collide: with no domain running, a restarted libvirtd numbers
    # its domains from 1 again (earlier tests of the session have started domains on the bed)
    for host in ("hv1", "hv2"):
        assert not bed.connect(host).listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        bed.stop_libvirtd(host)
        bed.start_libvirtd(host)
    f1, f2 = bed.guests("hv1"), bed.guests("hv2")
    try:
        g2 = f2.create(wait=False)
        g1 = f1.create(name=g2.name, wait=False)
        g2.wait_ready(90)
        g1.wait_ready(90)
        assert g1.dom.isActive() and g2.dom.isActive()
        assert g1.uuid != g2.uuid
        assert g1.dom.ID() == g2.dom.ID() == 1
        for guest in (g1, g2):  # the root libvirtd sees neither
            with pytest.raises(libvirt.libvirtError):
                conn.lookupByUUIDString(guest.uuid)
        with pytest.raises(libvirt.libvirtError):
            bed.connect("hv3").lookupByName(g2.name)
        # the guest's disk lives in hv2's /var/lib/libvirt/images, readable here through path()
        assert str(g2.host_paths["vda"]).startswith("/var/lib/libvirt/images/")
        assert g2.paths["vda"] == bed.path("hv2", g2.host_paths["vda"])
        assert g2.host_paths["vda"].as_posix() in g2.xml()
        assert not (pathlib.Path("/var/lib/libvirt/images") / g2.host_paths["vda"].parent.name).exists()
        g2.write_file("/data/bed-smoke", b"written on hv2")
        g2.sync()
        assert disk_read_file(g2.paths["vda"], "/bed-smoke", workdir=tmp_path) == b"written on hv2"

        # `up` on a running bed checks it and returns: same hosts, domains still running
        bed.up()
        assert {h: bed.hosts_info[h]["pid"] for h in bed.hosts} == pids
        assert g1.dom.isActive() and g2.dom.isActive() and g2.ping()

        # over SSH the way Ansible reaches real hosts: a play on all three
        play_file = tmp_path / "smoke.yml"
        play_file.write_text(SMOKE)
        play = bed.playbook(play_file)
        assert play.rc == 0, play.stdout + play.stderr
        assert {h: s["failures"] + s["unreachable"] for h, s in play.stats.items()} == {"hv1": 0, "hv2": 0, "hv3": 0}
        for _task, host, res in play.results(task="Hostname"):
            assert res["stdout"] == host
        assert _domain_names(play, "hv1") == {g1.name: g1.uuid}
        assert _domain_names(play, "hv2") == {g2.name: g2.uuid}
        assert _domain_names(play, "hv3") == {}
        assert sorted(p.name for p in shared.iterdir()) == ["hv1", "hv2", "hv3"]
        for host in bed.hosts:  # each host wrote its own name; each host sees all three files
            assert (shared / host).read_text() == host
            assert sorted(p.name for p in bed.path(host, "/srv/vmbackup").iterdir()) == ["hv1", "hv2", "hv3"]

        # /srv/vmbackup is a valid repository (its trust checks pass): the same name exported on two
        # hosts at once gives two VMs (uuids) in one repository, each manifest naming its host
        bed.fresh_repo()
        res = bed.ansible("hv1:hv2", "vmbackup.libvirt.export", {"repository": bed.repo, "name": g2.name})
        assert res.returncode == 0, res.stdout + res.stderr
        manifests = {json.loads(m.read_text())["vm"]["uuid"]: json.loads(m.read_text())
                     for m in (shared / "vms").glob("*/sets/*/manifest.json")}
        assert {u: m["host"] for u, m in manifests.items()} == {g1.uuid: "hv1", g2.uuid: "hv2"}
        assert {m["vm"]["name"] for m in manifests.values()} == {g2.name}

        # faults: hv1's libvirtd stopped (its QEMU keeps running, the other hosts are unaffected) ...
        qemu_pid = bed.path("hv1", f"/run/libvirt/qemu/{g1.name}.pid").read_text().strip()
        with bed.libvirtd_stopped("hv1"):
            with pytest.raises(libvirt.libvirtError):
                libvirt.open(bed.uri("hv1"))
            res = bed.ansible("hypervisors", "vmbackup.libvirt.domain_info")
            assert res.returncode != 0
            assert "hv1 | FAILED" in res.stdout and "hv2 | SUCCESS" in res.stdout and "hv3 | SUCCESS" in res.stdout, res.stdout
            assert json.loads(bed.script("status").stdout)["hv1"]["libvirtd"] is False
            bed.run("hv1", ["kill", "-0", qemu_pid])
        # ... and back: it finds its running domain again
        dom = bed.connect("hv1").lookupByUUIDString(g1.uuid)
        assert dom.isActive() and dom.ID() == g1.dom.ID()
        g1.dom = dom
        assert g1.ping()
        # ... then SSH to hv3 blocked: unreachable at once, libvirt there still answers
        with bed.ssh_blocked("hv3"):
            start = time.monotonic()
            res = bed.ansible("hv1:hv3", "ansible.builtin.ping")
            assert "hv3 | UNREACHABLE" in res.stdout and "hv1 | SUCCESS" in res.stdout, res.stdout
            assert time.monotonic() - start < 30
            assert bed.connect("hv3").getHostname() == "hv3"  # only SSH is gone
            assert json.loads(bed.script("status").stdout)["hv3"]["ssh_blocked"] is True
    finally:
        f1.cleanup()
        f2.cleanup()
    for host in bed.hosts:
        assert not list(bed.path(host, "/var/lib/libvirt/images").iterdir())
        assert bed.connect(host).listAllDomains() == []
    res = bed.ansible("hypervisors", "ansible.builtin.ping")
    assert res.returncode == 0, res.stdout
    bed.fresh_repo()
    assert not list(shared.iterdir())


def _processes_mentioning(text: str) -> list[str]:
    out = []
    for proc in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and str(os.getpid()) != proc.name:
            out.append(f"{proc.name}: {cmd}")
    return out


def test_down_leaves_nothing(tiny_guest_image):
    """A bed of its own (one host, its own state dir and addresses) with a QEMU running: `down`
    leaves no process, veth, mount or state directory behind, and the root's /srv is untouched."""
    state = pathlib.Path("/var/lib/vmbackup-testbed-downcheck")
    lock = _try_lock(state.with_name(state.name + ".lock"), wait=True)
    srv_before = sorted(os.listdir("/srv"))
    bed = Testbed(state, "10.240")
    try:
        start = time.monotonic()
        bed.up(hosts=1)
        up_seconds = time.monotonic() - start
        factory = GuestFactory(bed.connect("hv1"), images=pathlib.Path("/var/lib/libvirt/images"),
                               root=pathlib.Path(bed.hosts_info["hv1"]["root"]))
        guest = factory.create(wait=False)
        assert _processes_mentioning(f"guest={guest.name}"), "QEMU not running"
        init = bed.hosts_info["hv1"]["pid"]
        mnt_ns = os.readlink(f"/proc/{init}/ns/mnt")
        assert mnt_ns != os.readlink("/proc/self/ns/mnt")
        bed.close()
        start = time.monotonic()
        bed.script("down")
        down_seconds = time.monotonic() - start
        assert not state.exists()
        assert _processes_mentioning(str(state)) == []
        assert _processes_mentioning(f"guest={guest.name}") == []
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        assert "vb240-" not in links
        addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        assert "10.240." not in addrs
        # nobody is left in that mount namespace (it is gone with its last process)
        for proc in pathlib.Path("/proc").glob("[0-9]*"):
            try:
                assert os.readlink(proc / "ns" / "mnt") != mnt_ns, proc
            except OSError:
                pass
        assert sorted(os.listdir("/srv")) == srv_before
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            assert str(state) not in handle.read()
        print(f"bed of 1 host: up {up_seconds:.1f} s, down {down_seconds:.1f} s", file=sys.stderr)
    finally:
        if state.exists():
            bed.script("down", check=False)
        lock.close()
