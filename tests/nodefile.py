"""Write libvirt test-driver node files: hosts of any size, in any states.

``test:///abs/path.xml`` loads such a file in-process, and
``test+unix:///abs/path.xml`` serves it through a real libvirtd; tests and
benchmarks use both to meet real libvirt without real guests.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass

import libvirt

from compute_agent.states import PowerState

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"

RUNSTATES = {
    PowerState.RUNNING: libvirt.VIR_DOMAIN_RUNNING,
    PowerState.PAUSED: libvirt.VIR_DOMAIN_PAUSED,
    PowerState.SHUTDOWN: libvirt.VIR_DOMAIN_SHUTOFF,
    PowerState.CRASHED: libvirt.VIR_DOMAIN_CRASHED,
    PowerState.SUSPENDED: libvirt.VIR_DOMAIN_PMSUSPENDED,
}


@dataclass(frozen=True)
class TestDomain:
    name: str
    uuid: str
    state: PowerState = PowerState.RUNNING
    memory_mb: int = 64
    vcpus: int = 1


def write(path: str, domains: Iterable[TestDomain]) -> str:
    """Write a ``<node>`` of test domains to ``path``; return its ``test://`` URI."""
    ET.register_namespace("test", TEST_NS)
    node = ET.Element("node")
    for d in domains:
        dom = ET.SubElement(node, "domain", type="test")
        ET.SubElement(dom, "name").text = d.name
        ET.SubElement(dom, "uuid").text = d.uuid
        ET.SubElement(dom, "memory", unit="MiB").text = str(d.memory_mb)
        ET.SubElement(dom, "vcpu").text = str(d.vcpus)
        os_el = ET.SubElement(dom, "os")
        ET.SubElement(os_el, "type").text = "hvm"
        ET.SubElement(dom, f"{{{TEST_NS}}}runstate").text = str(RUNSTATES[d.state])
    ET.ElementTree(node).write(path, encoding="unicode")
    return f"test://{path}"
