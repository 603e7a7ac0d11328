"""restore's relocate_log_files: a restored copy's file-backed consoles and chardev logs leave the
original VM's files (one new path per old one), everything else is kept."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from ansible_collections.vmbackup.libvirt.plugins.module_utils._restore import relocate_log_files

XML = """<domain><name>web01</name><devices>
<serial type='file'><source path='/var/lib/libvirt/images/web01/console.log'/><target port='0'/></serial>
<console type='file'><source path='/var/lib/libvirt/images/web01/console.log'/><target type='serial' port='0'/></console>
<serial type='pty'><log file='/var/log/web01-pty.log' append='on'/><target port='1'/></serial>
<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
<channel type='file'><source path='/srv/web01-chan.out'/><target type='virtio' name='org.example.0'/></channel>
</devices></domain>"""


def test_copies_get_their_own_log_files():
    xml, moved = relocate_log_files(XML, "web01-copy", "/var/log/libvirt/qemu")
    assert moved == {
        "/var/lib/libvirt/images/web01/console.log": "/var/log/libvirt/qemu/web01-copy-serial0.log",
        "/var/log/web01-pty.log": "/var/log/libvirt/qemu/web01-copy-serial1-log.log",
        "/srv/web01-chan.out": "/var/log/libvirt/qemu/web01-copy-channel1.log",
    }
    root = ET.fromstring(xml)
    assert root.find("./devices/console/source").get("path") == root.find("./devices/serial/source").get("path")
    assert root.find("./devices/serial[2]/log").get("append") == "on"
    assert root.find("./devices/channel/target").get("name") == "org.qemu.guest_agent.0"
    assert "images/web01" not in xml and "/srv/" not in xml


def test_nothing_to_move_keeps_the_xml():
    xml = "<domain><name>a</name><devices><serial type='pty'><target port='0'/></serial></devices></domain>"
    assert relocate_log_files(xml, "a") == (xml, {})
    assert relocate_log_files("<domain><name>a</name></domain>", "a")[1] == {}
