"""Domain XML, built with an XML library from a validated DomainSpec.

Never by string formatting: a name is text in an element, so whatever it
holds cannot become markup.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from compute_agent.virt.spec import DomainSpec

VIRT_TYPES = ("kvm", "qemu", "test")


def build(spec: DomainSpec, virt_type: str) -> str:
    if virt_type not in VIRT_TYPES:
        raise ValueError(f"unsupported virt_type {virt_type!r}")
    domain = ET.Element("domain", type=virt_type)
    ET.SubElement(domain, "name").text = spec.name
    ET.SubElement(domain, "uuid").text = spec.uuid
    ET.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mb)
    ET.SubElement(domain, "currentMemory", unit="MiB").text = str(spec.memory_mb)
    ET.SubElement(domain, "vcpu").text = str(spec.vcpus)
    os_el = ET.SubElement(domain, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    # A guest that powers itself off stays defined (stopped); a crash is kept
    # visible as such rather than silently restarted.
    ET.SubElement(domain, "on_poweroff").text = "destroy"
    ET.SubElement(domain, "on_reboot").text = "restart"
    ET.SubElement(domain, "on_crash").text = "destroy"
    devices = ET.SubElement(domain, "devices")
    if virt_type != "test":
        # No display and no disk: the agent defines the machine, not its storage.
        ET.SubElement(devices, "memballoon", model="virtio")
    return ET.tostring(domain, encoding="unicode")


def parse_identity(xml: str) -> tuple[str, str]:
    """(name, uuid) of a domain XML document."""
    root = ET.fromstring(xml)
    return root.findtext("name") or "", root.findtext("uuid") or ""
