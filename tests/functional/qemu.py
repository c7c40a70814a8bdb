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
import uuid as uuidlib
from collections.abc import Iterator

import libvirt
import pytest

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


def remove_domains(prefix: str) -> list[str]:
    """Destroy and undefine every domain whose name starts with ``prefix``.

    Opens its own connection, so it works after a test killed or restarted
    the daemon the test's own connection used.
    """
    assert prefix.startswith(NAME_PREFIX) and len(prefix) > len(NAME_PREFIX)
    conn = open_system()
    removed = []
    try:
        for dom in conn.listAllDomains():
            name = dom.name()
            if not name.startswith(prefix):
                continue
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
            removed.append(name)
    finally:
        conn.close()
    return removed


@contextlib.contextmanager
def guests(prefix: str | None = None) -> Iterator[str]:
    """A fresh prefix whose domains are all removed when the block ends."""
    prefix = prefix or new_prefix()
    try:
        yield prefix
    finally:
        remove_domains(prefix)


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
