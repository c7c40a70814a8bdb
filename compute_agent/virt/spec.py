"""A validated description of a domain to create. Nothing reaches a driver unchecked."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from compute_agent import exception
from compute_agent.utils import is_uuid

# A libvirt domain name we are willing to create: conservative on purpose.
DOMAIN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")
MAX_VCPUS = 512
MIN_MEMORY_MB = 16
MAX_MEMORY_MB = 4 * 1024 * 1024


class InstanceRef(Protocol):
    """What a driver needs to know of an instance: the DB row satisfies it."""

    uuid: str
    domain_name: str


def validate_domain_name(name: Any) -> str:
    if not isinstance(name, str) or not DOMAIN_NAME_RE.match(name):
        raise exception.InvalidInput(
            f"invalid domain name {str(name)[:80]!r}: 1-200 of letters, digits, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return name


def render_domain_name(template: str, uuid: str) -> str:
    """The domain name ``instance_name_template`` gives ``uuid`` (checked by the caller)."""
    return template % {"uuid": uuid}


def validate_uuid(value: Any, what: str = "uuid") -> str:
    if not is_uuid(value):
        raise exception.InvalidInput(f"invalid {what} {str(value)[:80]!r}: not a UUID")
    return value.lower()


def validate_int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise exception.InvalidInput(f"{what} must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise exception.InvalidInput(f"{what} must be between {low} and {high}, not {value}")
    return value


@dataclass(frozen=True)
class DomainSpec:
    """Fields of a domain, each validated on construction."""

    name: str
    uuid: str
    vcpus: int
    memory_mb: int

    def __post_init__(self) -> None:
        validate_domain_name(self.name)
        object.__setattr__(self, "uuid", validate_uuid(self.uuid))
        validate_int(self.vcpus, "vcpus", 1, MAX_VCPUS)
        validate_int(self.memory_mb, "memory_mb", MIN_MEMORY_MB, MAX_MEMORY_MB)

    @classmethod
    def for_instance(cls, instance: Any) -> DomainSpec:
        return cls(
            name=instance.domain_name,
            uuid=instance.uuid,
            vcpus=instance.vcpus,
            memory_mb=instance.memory_mb,
        )
