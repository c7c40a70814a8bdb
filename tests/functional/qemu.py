"""The real libvirtd with QEMU guests: connections, names and clean-up for the tests.

``make test`` runs ``tools/setup-libvirtd.sh`` first, so ``qemu:///system``
answers. Every domain a test makes is named with a prefix unique to that
test (``ca-test-<hex>-``), through the agent's ``instance_name_template``,
and :func:`remove_domains` destroys and undefines exactly those: a test
never touches a guest it did not make.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import libvirt
import pytest

from compute_agent import green

QEMU_URI = "qemu:///system"
NAME_PREFIX = "ca-test-"
PID_DIR = pathlib.Path("/run/libvirt/qemu")


def open_system() -> libvirt.virConnect:
    """A connection to the real daemon, or a failure that says how to get one."""
    try:
        return libvirt.open(QEMU_URI)
    except libvirt.libvirtError as exc:
        pytest.fail(
            f"no libvirtd on {QEMU_URI} ({exc}); run tools/setup-libvirtd.sh (make test does)"
        )


def new_prefix() -> str:
    """A domain-name prefix no other test (or test run) uses."""
    return f"{NAME_PREFIX}{uuidlib.uuid4().hex[:8]}-"


def name_template(prefix: str) -> str:
    """The agent's ``[compute] instance_name_template`` for a prefix."""
    return f"{prefix}%(uuid)s"


def _remove_once(prefix: str) -> list[str]:
    """One pass: destroy the prefix's running domains at once, then undefine all.

    Destroys run side by side in native threads: libvirt takes about 2 s to
    stop a QEMU guest (SIGTERM, then it waits for the process), so 20 guests
    one after another would cost 40 s of a teardown. What is left (a call
    that met a daemon restart) is for the next pass.
    """
    conn = open_system()
    try:
        mine = [d for d in conn.listAllDomains() if d.name().startswith(prefix)]

        def destroy(dom: libvirt.virDomain) -> None:
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()

        for thread in [green.spawn(green.execute, destroy, d, name="destroy") for d in mine]:
            thread.wait()
        for dom in mine:
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
        return [d.name() for d in conn.listAllDomains() if d.name().startswith(prefix)]
    finally:
        conn.close()


def remove_domains(prefix: str, timeout: float = 30) -> None:
    """Destroy and undefine every domain whose name starts with ``prefix``, surely.

    Opens its own connections, so it works after a test killed or restarted
    the daemon; passes are repeated until nothing of the prefix is left, and
    a guest still there after ``timeout`` fails the test rather than leaking.
    """
    assert prefix.startswith(NAME_PREFIX) and len(prefix) > len(NAME_PREFIX)
    end = time.monotonic() + timeout
    while True:
        try:
            left = _remove_once(prefix)
        except (libvirt.libvirtError, pytest.fail.Exception) as exc:
            left = [f"(libvirtd not answering: {exc})"]
        if not left:
            return
        if time.monotonic() > end:
            raise AssertionError(f"guests of {prefix} not removed after {timeout} s: {left}")
        time.sleep(0.5)


@contextlib.contextmanager
def guests(prefix: str | None = None) -> Iterator[str]:
    """A fresh prefix whose domains are surely gone when the block ends."""
    prefix = prefix or new_prefix()
    try:
        yield prefix
    finally:
        remove_domains(prefix)


def guest_xml(name: str, uuid: str, memory_mb: int = 64) -> str:
    """A tiny diskless QEMU (TCG) guest, as a test would define it behind the agent's back."""
    domain = ET.Element("domain", type="qemu")
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "uuid").text = uuid
    ET.SubElement(domain, "memory", unit="MiB").text = str(memory_mb)
    ET.SubElement(domain, "vcpu").text = "1"
    os_el = ET.SubElement(domain, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    devices = ET.SubElement(domain, "devices")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")


def define_guest(
    conn: libvirt.virConnect, name: str, uuid: str, *, start: bool = False
) -> libvirt.virDomain:
    """Define (and optionally start) a guest with the libvirt API, as virsh would."""
    assert name.startswith(NAME_PREFIX), "a test only makes domains with a test prefix"
    dom = conn.defineXML(guest_xml(name, uuid))
    if start:
        dom.create()
    return dom


def qemu_pid(domain_name: str) -> int:
    """The PID of a running guest's QEMU process, from libvirt's pid file."""
    return int((PID_DIR / f"{domain_name}.pid").read_text().strip())


def libvirtd_pid() -> int:
    return int(pathlib.Path("/run/libvirtd.pid").read_text().strip())


def process_state(pid: int) -> str:
    """The one-letter state of a process (R, S, T for stopped, Z ...)."""
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def is_root() -> bool:
    return os.geteuid() == 0
