"""Hostile input: thousands of generated requests through RPC and the admin socket.

One agent runs in this process as ``compute-agent`` runs it (service,
manager, RPC server on the real RabbitMQ, admin socket server, SQLite),
on the real libvirt driver over libvirt's test driver, so the test can look
at the very hypervisor state the agent changed: an in-process
``test:///file.xml`` connection keeps a state of its own.

hypothesis generates the requests: wrong types, missing and extra fields,
huge and hostile strings (XML injection, entities, surrogates, NUL, RTL),
invalid UUIDs, out-of-range and boolean integers, nested junk, every method
of the dispatcher and unknown ones, broken envelopes and raw garbage lines.
The test keeps its own oracle (written from the rules, not calling the
agent's validators) of what each request must get: a correct answer or one
of the four typed errors, never a timeout, a generic error or silence. At
the end every domain on the hypervisor must be one a valid build asked for,
with exactly the expected XML.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import unicodedata
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import libvirt
import oslo_messaging
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from compute_agent import __version__, exception, log
from compute_agent.admin import protocol
from compute_agent.admin.server import AdminSocketServer
from compute_agent.db import migration
from compute_agent.db.api import Database
from compute_agent.dispatch import MAX_ARGS_BYTES, SYNC_FIELDS, Dispatcher
from compute_agent.manager import ComputeManager
from compute_agent.operations import BuildRequest
from compute_agent.rpc import PUBLIC_ERRORS, TOPIC
from compute_agent.rpc.server import RPCServer
from compute_agent.rpcapi import ComputeAPI, _local
from compute_agent.service import NodeService
from compute_agent.states import ActionSource
from compute_agent.virt.libvirt.driver import LibvirtDriver
from tests import nodefile
from tests.functional.rabbit import RabbitRun
from tests.helpers import wait_until

# Payloads each campaign sends (hypothesis examples); together well over 5000.
EXAMPLES = {"rpc": 1700, "rpc_envelope": 700, "admin": 1700, "admin_raw": 1200}
MIN_TOTAL = 5000
# Every this many payloads, both doors must still answer a ping.
PROBE_EVERY = 100
CALL_TIMEOUT = 10.0
# An error message is one line of at most this many characters.
MAX_MESSAGE = 2048
FOREIGN = nodefile.TestDomain("foreign-vm", "5a1e0e6e-0000-4000-8000-00000000f0e1")

# -- the oracle: the rules of a request, written down independently -----------

# method -> (required arguments, optional arguments); status is the admin socket's own.
SIGNATURES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "ping": (frozenset(), frozenset()),
    "get_host_state": (frozenset(), frozenset()),
    "list_instances": (frozenset(), frozenset()),
    "get_instance_info": (frozenset({"instance_uuid"}), frozenset()),
    "get_instance_stats": (frozenset({"instance_uuid"}), frozenset()),
    "build_instance": (frozenset({"instance"}), frozenset()),
    "start_instance": (frozenset({"instance_uuid"}), frozenset()),
    "stop_instance": (frozenset({"instance_uuid"}), frozenset()),
    "reboot_instance": (frozenset({"instance_uuid"}), frozenset({"hard"})),
    "delete_instance": (frozenset({"instance_uuid"}), frozenset()),
    "sync_power_states": (frozenset(), frozenset({"instance_uuid"})),
    "reap_deleted_instances": (frozenset(), frozenset()),
    "status": (frozenset(), frozenset()),
    "get_instance_actions": (frozenset({"instance_uuid"}), frozenset({"limit"})),
    "set_service_disabled": (frozenset({"disabled"}), frozenset({"reason"})),
}
ADMIN_ONLY = {"status", "reap_deleted_instances", "get_instance_actions", "set_service_disabled"}
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# Control, format, surrogate, private-use and unassigned code points.
NAME_FORBIDDEN = {"Cc", "Cf", "Cs", "Co", "Cn"}
# (vm_states an operation applies to, the vm_state it leaves)
OPERATIONS = {
    "stop_instance": ({"active", "paused", "suspended", "error"}, "stopped"),
    "start_instance": ({"stopped"}, "active"),
    "reboot_instance": ({"active", "paused", "suspended", "error"}, "active"),
    "delete_instance": (None, "deleted"),
}
OK = "ok"
INVALID = "InvalidInput"
NOT_FOUND = "InstanceNotFound"
BAD_STATE = "InstanceInvalidState"


def is_uuid(value: Any) -> bool:
    return isinstance(value, str) and UUID_RE.fullmatch(value) is not None


def is_name(value: Any) -> bool:
    return (
        isinstance(value, str)
        and 1 <= len(value) <= 255
        and value.strip() != ""
        and not any(unicodedata.category(c) in NAME_FORBIDDEN for c in value)
    )


def is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def is_build(payload: Any) -> bool:
    return (
        isinstance(payload, dict)
        and set(payload) == {"uuid", "name", "vcpus", "memory_mb"}
        and is_uuid(payload["uuid"])
        and is_name(payload["name"])
        and is_int(payload["vcpus"], 1, 512)
        and is_int(payload["memory_mb"], 16, 4 * 1024 * 1024)
    )


@dataclass
class Answer:
    outcome: str  # OK or the public error type's name
    result: Any = None
    message: str = ""


@dataclass
class Expected:
    outcomes: frozenset[str]
    check: Callable[[Any], None] | None = None  # judges an OK result


def expect(*outcomes: str, check: Callable[[Any], None] | None = None) -> Expected:
    return Expected(frozenset(outcomes), check)


@dataclass
class Ledger:
    """What the agent must hold, as the oracle sees it: its state and the counts."""

    host: str
    live: dict[str, dict[str, Any]] = field(default_factory=dict)  # uuid -> expected instance
    used: set[str] = field(default_factory=set)  # every UUID a build has taken
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)  # valid builds, by UUID
    sent: collections.Counter = field(default_factory=collections.Counter)
    outcomes: collections.Counter = field(default_factory=collections.Counter)

    # -- what a request must get ------------------------------------------

    def expect(self, method: Any, args: Any, *, admin: bool) -> Expected:
        if not isinstance(method, str) or method not in SIGNATURES:
            return expect(INVALID)
        if method in ADMIN_ONLY and not admin:
            return expect(INVALID)
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return expect(INVALID)
        if len(json.dumps(args)) > MAX_ARGS_BYTES:
            return expect(INVALID)
        required, optional = SIGNATURES[method]
        if not required <= args.keys() or args.keys() - required - optional:
            return expect(INVALID)
        return getattr(self, f"_{method}")(admin=admin, **args)

    def _ping(self, admin: bool) -> Expected:
        return expect(OK, check=lambda r: _equal(r, {"host": self.host, "version": __version__}))

    def _status(self, admin: bool) -> Expected:
        return expect(OK, check=lambda r: _equal(r["host"], self.host))

    def _get_host_state(self, admin: bool) -> Expected:
        def check(r: dict[str, Any]) -> None:
            _equal(r["host"], self.host)
            _equal(r["instances"], len(self.live))
            _equal(r["vcpus_used"], sum(i["vcpus"] for i in self.live.values()))
            _equal(r["memory_mb_used"], sum(i["memory_mb"] for i in self.live.values()))

        return expect(OK, check=check)

    def _list_instances(self, admin: bool) -> Expected:
        def check(r: list[dict[str, Any]]) -> None:
            _equal({i["uuid"]: _view(i) for i in r}, self.live)

        return expect(OK, check=check)

    def _instance(self, value: Any) -> tuple[Expected | None, str]:
        """InvalidInput or InstanceNotFound for a UUID argument, or None if it is live."""
        if not is_uuid(value):
            return expect(INVALID), ""
        uuid = value.lower()
        if uuid not in self.live:
            return expect(NOT_FOUND), uuid
        return None, uuid

    def _get_instance_info(self, admin: bool, instance_uuid: Any) -> Expected:
        refused, uuid = self._instance(instance_uuid)
        return refused or expect(OK, check=lambda r: _equal(_view(r), self.live[uuid]))

    def _get_instance_stats(self, admin: bool, instance_uuid: Any) -> Expected:
        refused, uuid = self._instance(instance_uuid)

        def check(r: dict[str, Any]) -> None:
            _equal(r["uuid"], uuid)
            if r["stats"] is not None:
                _equal(r["stats"]["uuid"], uuid)

        return refused or expect(OK, check=check)

    def _build_instance(self, admin: bool, instance: Any) -> Expected:
        if not is_build(instance):
            return expect(INVALID)
        uuid = instance["uuid"].lower()
        if uuid in self.used:
            return expect(BAD_STATE)
        want = {**_view(instance), "vm_state": "active"}

        def check(r: dict[str, Any]) -> None:
            _equal((r["uuid"], _view(r)), (uuid, want))
            _equal((r["host"], r["task_state"], r["power_state"]), (self.host, None, "running"))

        return expect(OK, check=check)

    def _operation(self, method: str, instance_uuid: Any) -> Expected:
        refused, uuid = self._instance(instance_uuid)
        if refused:
            return refused
        allowed, after = OPERATIONS[method]
        if allowed is not None and self.live[uuid]["vm_state"] not in allowed:
            return expect(BAD_STATE)
        return expect(OK, check=lambda r: _equal((r["uuid"], r["vm_state"]), (uuid, after)))

    def _start_instance(self, admin: bool, instance_uuid: Any) -> Expected:
        return self._operation("start_instance", instance_uuid)

    def _stop_instance(self, admin: bool, instance_uuid: Any) -> Expected:
        return self._operation("stop_instance", instance_uuid)

    def _delete_instance(self, admin: bool, instance_uuid: Any) -> Expected:
        return self._operation("delete_instance", instance_uuid)

    def _reboot_instance(self, admin: bool, instance_uuid: Any, hard: Any = False) -> Expected:
        if not isinstance(hard, bool):
            return expect(INVALID)
        return self._operation("reboot_instance", instance_uuid)

    def _get_instance_actions(self, admin: bool, instance_uuid: Any, limit: Any = 100) -> Expected:
        if not is_uuid(instance_uuid) or not is_int(limit, 1, 1000):
            return expect(INVALID)
        uuid = instance_uuid.lower()
        if uuid not in self.used:  # a deleted instance keeps its trail
            return expect(NOT_FOUND)

        def check(r: list[dict[str, Any]]) -> None:
            assert 1 <= len(r) <= limit, r
            ids = [row["id"] for row in r]
            _equal(ids, sorted(ids))

        return expect(OK, check=check)

    def _set_service_disabled(self, admin: bool, disabled: Any, reason: Any = None) -> Expected:
        if type(disabled) is not bool:
            return expect(INVALID)
        if reason is not None and not (
            disabled
            and isinstance(reason, str)
            and 1 <= len(reason) <= 255
            and reason.strip() != ""
            and reason.isprintable()
            and not reason.startswith("AUTO:")
        ):
            return expect(INVALID)

        def check(r: dict[str, Any]) -> None:
            _equal((r["host"], r["disabled"], r["disabled_reason"]), (self.host, disabled, reason))

        return expect(OK, check=check)

    def _sync_power_states(self, admin: bool, instance_uuid: Any = None) -> Expected:
        def check(r: dict[str, Any]) -> None:
            assert set(SYNC_FIELDS) <= set(r) and (admin or set(r) == set(SYNC_FIELDS)), r
            _equal(r["errors"], 0)

        if instance_uuid is None:
            return expect(OK, check=check)
        refused, _uuid = self._instance(instance_uuid)
        return refused or expect(OK, check=check)

    def _reap_deleted_instances(self, admin: bool) -> Expected:
        # Every delete went through the agent: no deleted instance keeps a
        # guest, and the foreign domain is nobody's to reap.
        return expect(OK, check=lambda r: _equal((r["found"], r["errors"]), (0, 0)))

    # -- what an answer changes -------------------------------------------

    def record(self, channel: str, method: Any, args: Any, answer: Answer) -> None:
        self.outcomes[(channel, answer.outcome)] += 1
        if answer.outcome != OK:
            return
        r = answer.result
        if method == "build_instance":
            self.used.add(r["uuid"])
            self.live[r["uuid"]] = _view(r)
            self.accepted[r["uuid"]] = dict(args["instance"])
        elif method == "delete_instance":
            del self.live[r["uuid"]]
        elif method in OPERATIONS:
            self.live[r["uuid"]]["vm_state"] = r["vm_state"]


def _view(instance: dict[str, Any]) -> dict[str, Any]:
    """The fields of an instance the oracle predicts."""
    keys = ("name", "vcpus", "memory_mb") + (("vm_state",) if "vm_state" in instance else ())
    return {k: instance[k] for k in keys}


def _equal(got: Any, want: Any) -> None:
    assert got == want, f"got {got!r:.500}, expected {want!r:.500}"


# -- the generators -----------------------------------------------------------

XML_ATTACKS = [
    "</name><devices><disk type='file'><source file='/etc/shadow'/></disk></devices><name>",
    "</uuid><devices><hostdev/></devices><uuid>",
    "&xxe;",
    '<!DOCTYPE d [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><d>&xxe;</d>',
    "<![CDATA[</domain>]]>",
    "]]>",
    "<?xml version='1.0'?>",
    "<domain type='kvm'><name>evil</name></domain>",
    "\"'<>&",
]
HOSTILE_STRINGS = [
    *XML_ATTACKS,
    "",
    " ",
    "\t\n",
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfffy",
    "\u202eevil\u202c",
    "\u200f",
    "\ufeffbom",
    "עברית",
    "مرحبا",
    "日本語",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "🦀",
    "e\u0301",
    "\U000e0001",
    "\ue000",
    "\U0010ffff",
    "'; DROP TABLE instances; --",
    "%(uuid)s",
    "%s%s%n",
    "{0}{1}",
    "${jndi:ldap://x}",
    "../../etc/passwd",
    "\\",
    "instance-00000000-0000-4000-8000-000000000001",
    "x" * 256,
    "é" * 255,
    "x" * 70_000,
]
HOSTILE_TEXT = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.text(max_size=30),
    st.text(
        st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr), st.sampled_from("<>&'\"")),
        max_size=30,
    ),
)
INTEGERS = st.one_of(
    st.integers(-5, 600),
    st.integers(),
    st.sampled_from(
        [0, 15, 16, 17, 511, 512, 513, 4194303, 4194304, 4194305, -(2**31), 2**31, 2**63, 2**64]
    ),
    st.sampled_from([10**100, -(10**300), 10**1000]),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INTEGERS,
    st.floats(allow_nan=True, allow_infinity=True),
    HOSTILE_TEXT,
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(HOSTILE_TEXT, inner, max_size=4)
    ),
    max_leaves=8,
)


@dataclass(frozen=True)
class Ref:
    """A UUID of an instance the agent holds (or once held), chosen when sent."""

    index: int
    deleted: bool = False
    upper: bool = False


def _uuid_forms(u: uuidlib.UUID) -> list[Any]:
    s = str(u)
    return [
        s.upper(),
        u.hex,
        "{" + s + "}",
        "urn:uuid:" + s,
        s + "\n",
        " " + s,
        s[:-1],
        s + "0",
        s[:8] + "_" + s[9:],
        s.replace("-", "\u2010"),
        s[:-1] + "g",
        s.translate(str.maketrans("0123456789", "０１２３４５６７８９")),
        s[:-12] + "</uuid><x/>",
        u.int,
        [s],
        {"uuid": s},
    ]


INVALID_UUIDS = st.builds(_uuid_forms, st.uuids()).flatmap(st.sampled_from)


@dataclass(frozen=True)
class Fresh:
    """A UUID no request has used yet, made when sent (hypothesis repeats its own often)."""

    upper: bool = False


FRESH_UUIDS = st.one_of(
    st.builds(Fresh, st.booleans()),
    st.builds(Fresh, st.booleans()),
    st.uuids().map(str),
    st.sampled_from([str(uuidlib.UUID(int=0)), "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF"]),
)
REFS = st.builds(Ref, st.integers(0, 10_000), st.booleans(), st.booleans())
UUID_ARGS = st.one_of(REFS, REFS, FRESH_UUIDS, INVALID_UUIDS, JUNK)

VALID_NAMES = st.one_of(
    st.text(
        st.characters(exclude_categories=sorted(NAME_FORBIDDEN)), min_size=1, max_size=255
    ).filter(str.strip),
    st.sampled_from(
        [a for a in XML_ATTACKS + HOSTILE_STRINGS if is_name(a)] + ["web-1", "é" * 255]
    ),
)
VALID_BUILDS = st.fixed_dictionaries(
    {
        "uuid": FRESH_UUIDS,
        "name": VALID_NAMES,
        "vcpus": st.integers(1, 512),
        "memory_mb": st.one_of(st.integers(16, 8192), st.integers(16, 4 * 1024 * 1024)),
    }
)
BUILD_FIELD_JUNK = {
    "uuid": st.one_of(INVALID_UUIDS, JUNK),
    "name": st.one_of(HOSTILE_TEXT, JUNK),
    "vcpus": st.one_of(INTEGERS, JUNK, st.just(True), st.just(1.0), st.just("2")),
    "memory_mb": st.one_of(INTEGERS, JUNK, st.just(False), st.just(64.0), st.just("64")),
}


@st.composite
def broken_builds(draw: st.DrawFn) -> Any:
    """A valid build with one thing wrong (or several), or no object at all."""
    payload = dict(draw(VALID_BUILDS))
    how = draw(st.sampled_from(["field", "field", "missing", "extra", "reuse", "not-object"]))
    if how == "field":
        for name in sorted(draw(st.sets(st.sampled_from(sorted(BUILD_FIELD_JUNK)), min_size=1))):
            payload[name] = draw(BUILD_FIELD_JUNK[name])
    elif how == "missing":
        for name in sorted(draw(st.sets(st.sampled_from(sorted(payload)), min_size=1))):
            del payload[name]
    elif how == "extra":
        key = draw(
            st.one_of(st.sampled_from(["host", "image", "uuid ", "UUID", "xml"]), HOSTILE_TEXT)
        )
        if key not in payload:
            payload[key] = draw(JUNK)
    elif how == "reuse":
        payload["uuid"] = draw(REFS)  # a UUID already taken
    else:
        return draw(JUNK)
    return payload


ARG_NAMES = st.one_of(
    st.sampled_from(
        [
            "instance_uuid",
            "instance",
            "hard",
            "host",
            "method",
            "timeout",
            "ctxt",
            "source",
            "self",
            "kwargs",
            "args",
            "__class__",
            "uuid",
        ]
    ),
    HOSTILE_TEXT,
)
UNKNOWN_METHODS = st.one_of(
    st.sampled_from(
        [
            "",
            "explode",
            "_forward",
            "__init__",
            "__getattr__",
            "__class__",
            "target",
            "methods",
            "call",
            "dispatcher",
            "oslo_rpc_server_ping",
            "PING",
            "ping ",
            " ping",
            "ping\x00",
            "ping\n",
            "status\u200b",
            "build_instance\ud800",
            "a" * 1000,
        ]
    ),
    HOSTILE_TEXT,
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """(method, arguments): mostly methods of the table with good or broken arguments."""
    if draw(st.integers(0, 9)) == 0:
        return draw(UNKNOWN_METHODS), draw(st.dictionaries(ARG_NAMES, JUNK, max_size=3))
    method = draw(st.sampled_from(sorted(SIGNATURES) + ["build_instance"] * 7))
    required, optional = SIGNATURES[method]
    args: dict[str, Any] = {}
    for name in sorted(required | optional):
        if name in optional and draw(st.booleans()):
            continue
        if name == "instance":
            args[name] = draw(st.one_of(VALID_BUILDS, VALID_BUILDS, broken_builds()))
        elif name in ("hard", "disabled"):
            args[name] = draw(st.one_of(st.booleans(), st.booleans(), JUNK))
        elif name == "limit":
            args[name] = draw(st.one_of(st.integers(1, 1000), INTEGERS, JUNK))
        elif name == "reason":
            args[name] = draw(st.one_of(st.just("maintenance"), st.just("AUTO: x"), HOSTILE_TEXT))
        else:
            args[name] = draw(UUID_ARGS)
    if draw(st.integers(0, 5)) == 0 and args:
        del args[draw(st.sampled_from(sorted(args)))]
    if draw(st.integers(0, 5)) == 0:
        args[draw(ARG_NAMES)] = draw(JUNK)
    return method, args


# -- the agent under test -----------------------------------------------------


class _Records(logging.Handler):
    """Every record the agent logs, kept for the checks; and the log file's write failures."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.failures: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def failed(self, record: logging.LogRecord) -> None:
        self.failures.append(f"{record.name}: {record.msg!r:.200}")


class Harness:
    """The agent, the two doors into it, and the oracle's ledger."""

    def __init__(self, workdir: str, db_url: str, run: RabbitRun) -> None:
        self.workdir = workdir
        self.run = run
        self.host = run.host("hostile")
        self.uri = nodefile.write(os.path.join(workdir, "node.xml"), [FOREIGN])
        path = os.path.join(workdir, "agent.conf")
        with open(path, "w") as f:
            f.write(
                "[compute]\nstats_interval = 2\nshutdown_timeout = 5\n"
                f"[libvirt]\nconnection_uri = {self.uri}\n"
            )
        conf = run.conf(
            self.host,
            path,
            state_path=workdir,
            report_interval=1,
            graceful_shutdown_timeout=1.0,
        )
        self.db = Database(db_url)
        self.driver = LibvirtDriver(conf)
        manager = ComputeManager(conf, self.db, self.driver)
        self.service = NodeService(conf, self.db, components=[manager])
        self.dispatcher = Dispatcher(manager, self.service)
        self.rpc = RPCServer(conf, self.dispatcher)
        self.sock_path = os.path.join(workdir, "admin.sock")
        self.admin = AdminSocketServer(self.sock_path, self.dispatcher, grace=1.0)
        self.service.components += [self.rpc, self.admin]
        self.ledger = Ledger(self.host)
        self.api = ComputeAPI(run.conf(), timeout=CALL_TIMEOUT)
        self.target = oslo_messaging.Target(topic=TOPIC, server=self.host)
        self._conn: socket.socket | None = None
        self._reader: Any = None
        self.campaigns_done: dict[str, float] = {}
        self.fresh = 0
        self.records = _Records()
        self.log_file: logging.Handler = self.records

    def start(self) -> None:
        self.service.start()
        assert self.rpc.serving.wait(15), "RPC server did not start"
        # Every domain defined on the agent's connection, as libvirt's lifecycle
        # events tell the agent (a connection takes one lifecycle callback:
        # the agent's, which this taps).
        self.defined: list[tuple[str, str]] = []
        host = self.driver.host
        forward = host.on_lifecycle
        assert host.wants_events

        def tap(name: str, uuid: str, event: int, detail: int) -> None:
            if event == libvirt.VIR_DOMAIN_EVENT_DEFINED:
                self.defined.append((name, uuid.lower()))
            forward(name, uuid, event, detail)

        host.on_lifecycle = tap

    def stop(self) -> None:
        self._close()
        self.service.stop()
        self.api.close()

    # -- RPC --------------------------------------------------------------

    def rpc_call(self, method: str, args: dict[str, Any]) -> Answer:
        """Through rpcapi; arguments named like its own parameters go one level lower."""
        if args.keys() & {"host", "method", "timeout", "ctxt", "self"}:
            return self.rpc_envelope({"method": method, "args": args, "version": "1.0"})
        try:
            result = self.api.call(self.host, method, **args)
        except PUBLIC_ERRORS as exc:
            assert type(exc) in PUBLIC_ERRORS, f"not a public class: {type(exc)!r}"
            return _error_answer(type(exc).__name__, str(exc))
        return Answer(OK, result)

    def rpc_envelope(self, message: dict[str, Any]) -> Answer:
        """One message as the oslo envelope carries it, below RPCClient."""
        try:
            result = self.api.transport._send(
                self.target, {}, message, wait_for_reply=True, timeout=CALL_TIMEOUT
            )
        except PUBLIC_ERRORS as exc:  # rebuilt by oslo as <Name>_Remote
            local = _local(exc)
            assert type(local) in PUBLIC_ERRORS, f"not a public class: {type(exc)!r}"
            return _error_answer(type(local).__name__, str(local))
        return Answer(OK, result)

    # -- the admin socket -------------------------------------------------

    def _connect(self) -> None:
        if self._conn is None:
            self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._conn.settimeout(CALL_TIMEOUT)
            self._conn.connect(self.sock_path)
            self._reader = self._conn.makefile("rb")

    def _close(self) -> None:
        if self._conn is not None:
            self._reader.close()
            self._conn.close()
            self._conn = self._reader = None

    def admin_line(self, line: bytes, *, closes: bool = False) -> Answer:
        """Send one line, read its one reply (after any progress lines)."""
        self._connect()
        assert self._conn is not None
        self._conn.sendall(line)
        while True:
            raw = self._reader.readline()
            assert raw, f"the agent closed the connection without answering {line[:200]!r}"
            reply = json.loads(raw)
            if set(reply) == {"progress"}:
                assert set(reply["progress"]) == {"done", "total"}, reply
                continue
            break
        answer = _admin_answer(reply)
        if closes:
            assert self._reader.readline() == b"", "connection left open after an oversize line"
            self._close()
        return answer

    def admin_blank(self, line: bytes) -> None:
        """A blank line gets no reply: the next request's reply is the next line."""
        self._connect()
        assert self._conn is not None
        self._conn.sendall(line)
        answer = self.admin_line(protocol.request("ping"))
        assert answer.outcome == OK and answer.result["host"] == self.host, answer

    # -- the checks -------------------------------------------------------

    def judge(self, channel: str, method: Any, args: Any, want: Expected, answer: Answer) -> None:
        assert answer.outcome in want.outcomes, (
            f"{channel} {str(method)[:80]!r}: got {answer.outcome} ({answer.message[:300]}), "
            f"expected {sorted(want.outcomes)}"
        )
        if answer.outcome == OK and want.check is not None:
            want.check(answer.result)
        self.ledger.record(channel, method, args, answer)
        if method == "build_instance" and answer.outcome == OK:
            self.check_built(answer.result["uuid"])
        self.ledger.sent[channel] += 1
        if sum(self.ledger.sent.values()) % PROBE_EVERY == 0:
            self.check_alive()

    def check_alive(self) -> None:
        """Both doors answer, and the agent's greenthreads are all still there."""
        t0 = time.monotonic()
        assert self.api.ping(self.host, timeout=5)["host"] == self.host
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.sock_path)
            s.sendall(protocol.request("status"))
            reply = json.loads(s.makefile("rb").readline())
        assert reply["ok"] is True and reply["result"]["host"] == self.host, reply
        assert time.monotonic() - t0 < 5
        assert self.rpc.serving.is_set()
        # The accepter that took the status connection may be the last one,
        # its successor a thread start away: one in accept() again, soon.
        assert wait_until(lambda: self.admin.statistics().accepting >= 1), self.admin.statistics()
        for task in self.service.runner.tasks.values():
            assert task._thread is not None and not task._thread.dead, task.name
        assert self.driver.connected
        assert self.driver.host._dispatcher is not None and not self.driver.host._dispatcher.dead

    def resolve(self, value: Any) -> Any:
        """Every Ref in ``value`` becomes the UUID of an instance built (or deleted) so far."""
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if isinstance(value, Fresh):
            self.fresh += 1
            made = str(uuidlib.UUID(int=(0xF5E5 << 112) + self.fresh, version=4))
            return made.upper() if value.upper else made
        if not isinstance(value, Ref):
            return value
        pool = sorted((self.ledger.used - set(self.ledger.live)) if value.deleted else [])
        pool = pool or sorted(self.ledger.live) or sorted(self.ledger.used)
        if not pool:
            return str(uuidlib.UUID(int=value.index, version=4))
        chosen = pool[value.index % len(pool)]
        return chosen.upper() if value.upper else chosen

    def check_built(self, uuid: str) -> None:
        """The domain a valid build defined, at once: exactly the XML the payload asked for."""
        name = f"instance-{uuid}"
        payload = self.ledger.accepted[uuid]
        assert is_build(payload), payload
        xml = self.driver.host.conn.lookupByName(name).XMLDesc(0)
        check_domain_xml(xml, name, uuid, payload["vcpus"], payload["memory_mb"])

    def domains(self) -> dict[str, Any]:
        """Every domain of the hypervisor, read on the agent's own connection."""
        return {d.name(): d for d in self.driver.host.conn.listAllDomains(0)}


def _error_answer(type_name: str, message: str) -> Answer:
    assert "\n" not in message and 0 < len(message) <= MAX_MESSAGE, f"message {message!r:.300}"
    assert "Traceback" not in message, message[:500]
    return Answer(type_name, message=message)


def _admin_answer(reply: Any) -> Answer:
    """A final admin reply, checked to be a result or a typed, one-line error."""
    assert isinstance(reply, dict) and reply.get("ok") in (True, False), reply
    if reply["ok"]:
        assert set(reply) == {"ok", "result"}, reply
        return Answer(OK, reply["result"])
    assert set(reply) == {"ok", "error"} and set(reply["error"]) == {"type", "message"}, reply
    type_name, message = reply["error"]["type"], reply["error"]["message"]
    cls = getattr(exception, type_name, None)
    public = [p for p in PUBLIC_ERRORS if isinstance(cls, type) and issubclass(cls, p)]
    assert public, f"untyped error {type_name}: {message[:300]}"
    return _error_answer(public[0].__name__, message)


def _json_round_trip(value: Any) -> Any:
    """What the agent receives of ``value`` after JSON (tuples become lists, and so on)."""
    return json.loads(json.dumps(value))


@pytest.fixture(scope="module")
def harness(db_url_factory) -> Iterator[Harness]:
    # SQLite, the agent's embedded default: other tests restart the database
    # servers now and then, which is not what this test is about.
    url = db_url_factory("sqlite")
    db = Database(url)
    migration.upgrade(db)
    db.dispose()
    # pytest's tmp_path can exceed the 107 bytes of a UNIX socket address.
    workdir = tempfile.mkdtemp(prefix="ca-hostile-")
    run = RabbitRun()
    # The agent's own log file handler, as [DEFAULT] log_file makes it.
    log_file = log.make_handler(os.path.join(workdir, "agent.log"))
    records = _Records()
    log_file.handleError = records.failed  # type: ignore[method-assign]
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(log_file)
    root.addHandler(records)
    root.setLevel(logging.DEBUG)  # every log line the fuzz provokes is written
    quiet = {n: logging.getLogger(n).level for n in ("oslo_messaging", "amqp", "kombu")}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    h = Harness(workdir, url, run)
    h.records, h.log_file = records, log_file
    try:
        h.start()
        yield h
    finally:
        h.stop()
        root.removeHandler(log_file)
        root.removeHandler(records)
        log_file.close()
        root.setLevel(old_level)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
        run.cleanup()
        h.db.dispose()
        shutil.rmtree(workdir, ignore_errors=True)


HYPOTHESIS = dict(
    deadline=None,
    derandomize=True,  # the same payloads every run: a failure reproduces
    # No shrinking: the agent's state moves on with every payload, so a
    # replayed example meets another state; the first failure is the report.
    phases=(Phase.explicit, Phase.generate),
    database=None,
    suppress_health_check=list(HealthCheck),
)


# -- the campaigns ------------------------------------------------------------

VERSIONS = {  # the envelope's version -> whether this host serves it
    "1.0": True,
    "1.00": True,
    "01.0": True,
    "1.0.0": False,
    "1.9": False,
    "0.9": False,
    "2.0": False,
    "9999.9999": False,
    "1": False,
    "one": False,
    "": False,
    "1.0; drop": False,
    "1.0\x00": False,
    1.0: False,
    None: False,
}


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """An oslo message: a request, often with a broken method, args, version or namespace."""
    method, args = draw(requests())
    message: dict[str, Any] = {"method": method, "args": args, "version": "1.0"}
    for part in sorted(
        draw(st.sets(st.sampled_from(["method", "args", "version", "namespace", "drop"])))
    ):
        if part == "method":
            message["method"] = draw(st.one_of(JUNK, UNKNOWN_METHODS))
        elif part == "args":
            message["args"] = draw(JUNK)
        elif part == "version":
            message["version"] = draw(st.sampled_from(list(VERSIONS)))
        elif part == "namespace":
            message["namespace"] = draw(st.one_of(HOSTILE_TEXT, JUNK))
        else:
            del message[draw(st.sampled_from(["method", "args", "version"]))]
    return message


def expect_envelope(ledger: Ledger, message: dict[str, Any]) -> Expected:
    """The RPC server's own rules for the envelope, then the request's."""
    method = message.get("method")
    if not isinstance(method, str) or not method:
        return expect(INVALID)
    args = message.get("args", {})
    if args is not None and not isinstance(args, dict):
        return expect(INVALID)
    version = message.get("version", "1.0")
    if not (isinstance(version, str | float | type(None)) and VERSIONS.get(version, False)):
        return expect(INVALID)
    if message.get("namespace") is not None:
        return expect(INVALID)
    return ledger.expect(method, args, admin=False)


@st.composite
def admin_envelopes(draw: st.DrawFn) -> Any:
    """An admin request object, often with a broken method, args or an extra field."""
    method, args = draw(requests())
    message: dict[str, Any] = {"method": method, "args": args}
    for part in sorted(
        draw(st.sets(st.sampled_from(["method", "args", "extra", "drop", "null-args"])))
    ):
        if part == "method":
            message["method"] = draw(st.one_of(JUNK, UNKNOWN_METHODS))
        elif part == "args":
            message["args"] = draw(JUNK)
        elif part == "extra":
            message[draw(st.one_of(st.sampled_from(["version", "id", "Method"]), HOSTILE_TEXT))] = (
                draw(JUNK)
            )
        elif part == "null-args":
            message["args"] = None
        else:
            message.pop(draw(st.sampled_from(["method", "args"])), None)
    return message


def expect_admin(ledger: Ledger, message: Any) -> Expected:
    """The admin protocol's rules for the request object, then the request's."""
    if not isinstance(message, dict) or set(message) - {"method", "args"}:
        return expect(INVALID)
    method = message.get("method")
    if not isinstance(method, str) or not method:
        return expect(INVALID)
    args = message.get("args")
    if args is not None and not isinstance(args, dict):
        return expect(INVALID)
    return ledger.expect(method, args, admin=True)


LIMIT = protocol.MAX_REQUEST_BYTES


@st.composite
def raw_lines(draw: st.DrawFn) -> bytes:
    """One line of bytes (newline included) that is rarely a valid request."""
    kind = draw(
        st.sampled_from(
            [
                "binary",
                "text",
                "json-non-object",
                "non-utf8",
                "truncated",
                "nested",
                "bignum",
                "blank",
                "oversize",
                "at-limit",
                "request-utf8",
                "bom",
            ]
        )
    )
    if kind == "binary":
        body = draw(st.binary(min_size=1, max_size=300))
    elif kind == "text":
        body = draw(HOSTILE_TEXT).encode("utf-8", "surrogatepass")
    elif kind == "json-non-object":
        body = json.dumps(draw(st.one_of(SCALARS, st.lists(JUNK, max_size=3)))).encode()
    elif kind == "non-utf8":
        good = json.dumps({"method": "ping", "args": {"x": draw(HOSTILE_TEXT)}}, ensure_ascii=False)
        bad = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80"]))
        cut = draw(st.integers(0, len(good)))
        body = (
            good[:cut].encode("utf-8", "surrogatepass")
            + bad
            + good[cut:].encode("utf-8", "surrogatepass")
        )
    elif kind == "truncated":
        text = json.dumps({"method": "get_instance_info", "args": {"instance_uuid": "x" * 40}})
        body = text[: draw(st.integers(0, len(text) - 1))].encode()
    elif kind == "nested":
        depth = draw(st.one_of(st.integers(1, 50), st.integers(900, 1100), st.just(100_000)))
        body = b'{"method": "ping", "args": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
    elif kind == "bignum":
        body = b'{"method": "ping", "args": {"a": ' + b"9" * draw(st.integers(4000, 5000)) + b"}}"
    elif kind == "blank":
        body = draw(st.sampled_from([b"", b" ", b"\t", b"\r", b" \t \r"]))
    elif kind == "oversize":
        body = b'{"method": "ping", "args": {"a": "' + b"x" * (LIMIT + draw(st.integers(0, 99)))
    elif kind == "at-limit":
        head = b'{"method": "ping", "args": {"a": "'
        body = head + b"x" * (LIMIT - len(head) - 4) + b'"}}'
    elif kind == "bom":
        body = b"\xef\xbb\xbf" + protocol.request("ping").rstrip(b"\n")
    else:
        method, args = draw(requests())
        body = json.dumps(
            {"method": method, "args": args}, ensure_ascii=False, default=_ref_as_uuid
        ).encode("utf-8", "surrogatepass")
    return body.replace(b"\n", b" ") + b"\n"


def _ref_as_uuid(value: Any) -> str:
    """A raw line is made before it meets the agent's state: a Ref is a UUID of its own."""
    assert isinstance(value, Ref | Fresh), value
    return str(uuidlib.UUID(int=(0xBAD0 << 112) + next(_RAW_UUIDS), version=4))


_RAW_UUIDS = itertools.count(1)


def expect_raw(ledger: Ledger, line: bytes) -> Expected | None:
    """What a raw line must get; None for a blank line, which gets no reply."""
    if len(line) > LIMIT:
        return expect(INVALID)
    if not line.strip():
        return None
    try:
        message = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return expect(INVALID)
    return expect_admin(ledger, message)


def _rpc(h: Harness) -> None:
    @settings(max_examples=EXAMPLES["rpc"], **HYPOTHESIS)
    @given(requests())
    def send(request: tuple[str, dict[str, Any]]) -> None:
        method, args = request
        args = h.resolve(args)
        want = h.ledger.expect(method, _json_round_trip(args), admin=False)
        h.judge("rpc", method, args, want, h.rpc_call(method, args))

    send()


def _rpc_envelope(h: Harness) -> None:
    @settings(max_examples=EXAMPLES["rpc_envelope"], **HYPOTHESIS)
    @given(envelopes())
    def send(message: dict[str, Any]) -> None:
        if "args" in message:
            message = {**message, "args": h.resolve(message["args"])}
        want = expect_envelope(h.ledger, _json_round_trip(message))
        answer = h.rpc_envelope(message)
        h.judge("rpc_envelope", message.get("method"), message.get("args"), want, answer)

    send()


def _admin(h: Harness) -> None:
    @settings(max_examples=EXAMPLES["admin"], **HYPOTHESIS)
    @given(admin_envelopes(), st.booleans())
    def send(message: Any, ascii_only: bool) -> None:
        if isinstance(message, dict) and "args" in message:
            message = {**message, "args": h.resolve(message["args"])}
        line = json.dumps(message, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
        line = line + b"\n"
        want = expect_raw(h.ledger, line)
        assert want is not None
        answer = h.admin_line(line, closes=len(line) > LIMIT)
        args = message.get("args") if isinstance(message, dict) else None
        h.judge(
            "admin",
            message.get("method") if isinstance(message, dict) else None,
            args,
            want,
            answer,
        )

    send()


def _admin_raw(h: Harness) -> None:
    @settings(max_examples=EXAMPLES["admin_raw"], **HYPOTHESIS)
    @given(raw_lines())
    def send(line: bytes) -> None:
        want = expect_raw(h.ledger, line)
        if want is None:
            h.admin_blank(line)
            h.ledger.sent["admin_raw"] += 1
            return
        answer = h.admin_line(line, closes=len(line) > LIMIT)
        message = _decoded(line)
        method = message.get("method") if isinstance(message, dict) else None
        args = message.get("args") if isinstance(message, dict) else None
        h.judge("admin_raw", method, args, want, answer)

    send()


def _decoded(line: bytes) -> Any:
    try:
        return json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


CAMPAIGNS: dict[str, Callable[[Harness], None]] = {
    "rpc": _rpc,
    "rpc_envelope": _rpc_envelope,
    "admin": _admin,
    "admin_raw": _admin_raw,
}


def campaign(h: Harness, name: str) -> None:
    """Run one campaign once per module (the final test runs those not yet run)."""
    if name in h.campaigns_done:
        return
    t0 = time.monotonic()
    CAMPAIGNS[name](h)
    h.campaigns_done[name] = time.monotonic() - t0
    h.check_alive()
    check_hypervisor(h)
    check_log(h)
    print(
        f"\n{name}: {h.ledger.sent[name]} payloads in {h.campaigns_done[name]:.1f} s; "
        + ", ".join(f"{o} {n}" for (c, o), n in sorted(h.ledger.outcomes.items()) if c == name)
    )


def check_hypervisor(h: Harness) -> None:
    """Every domain is one a valid build asked for, with exactly the expected XML.

    Also those already deleted: libvirt's own DEFINED events name every
    domain ever defined on the connection, and each must be a valid build's.
    """
    accepted = {(f"instance-{u}", u) for u in h.ledger.accepted}
    assert wait_until(lambda: len(h.defined) >= len(accepted), 10), (len(h.defined), len(accepted))
    assert sorted(h.defined) == sorted(accepted), sorted(set(h.defined) ^ accepted)[:5]
    domains = h.domains()
    assert FOREIGN.name in domains, "the foreign domain was touched"
    assert domains.pop(FOREIGN.name).UUIDString() == FOREIGN.uuid
    want = {f"instance-{u}": u for u in h.ledger.live}
    assert set(domains) == set(want), (
        f"unexpected domains {sorted(set(domains) - set(want))[:5]}, "
        f"missing {sorted(set(want) - set(domains))[:5]}"
    )
    for name, dom in domains.items():
        uuid = want[name]
        payload = h.ledger.accepted[uuid]
        assert is_build(payload), payload
        check_domain_xml(dom.XMLDesc(0), name, uuid, payload["vcpus"], payload["memory_mb"])


# The element tree of a domain the agent defined, as the test driver describes it.
DOMAIN_SHAPE = [
    "name",
    "uuid",
    "memory",
    "currentMemory",
    "vcpu",
    "os",
    "clock",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "devices",
]


def check_domain_xml(xml: str, name: str, uuid: str, vcpus: int, memory_mb: int) -> None:
    root = ET.fromstring(xml)
    assert root.tag == "domain" and root.get("type") == "test", xml
    assert [c.tag for c in root] == DOMAIN_SHAPE, xml
    assert root.findtext("name") == name and root.findtext("uuid") == uuid, xml
    assert root.find("memory").get("unit") == "KiB", xml
    assert int(root.findtext("memory")) == int(root.findtext("currentMemory")) == memory_mb * 1024
    assert int(root.findtext("vcpu")) == vcpus, xml
    assert [c.tag for c in root.find("os")] == ["type", "boot"], xml
    assert root.findtext("os/type") == "hvm"
    assert len(root.find("devices")) == 0, xml
    assert all(not (e.text or "").strip() for e in root.iter() if e.tag in ("os", "devices"))


def check_log(h: Harness) -> None:
    """No traceback, no error logged, no line the log could not write."""
    assert h.records.failures == [], h.records.failures[:5]
    bad = [
        f"{r.levelname} {r.name}: {r.getMessage()[:300]}"
        for r in h.records.records
        if r.exc_info or r.levelno >= logging.ERROR
    ]
    assert bad == [], bad[:5]
    h.log_file.flush()
    with open(os.path.join(h.workdir, "agent.log"), encoding="utf-8") as f:
        assert "Traceback" not in f.read()


# -- the tests ----------------------------------------------------------------


def test_the_oracle_knows_every_method(harness):
    assert set(SIGNATURES) == set(harness.dispatcher.methods)
    for name, (required, optional) in SIGNATURES.items():
        spec = harness.dispatcher.methods[name]
        assert (set(spec.required), set(spec.optional)) == (required, optional), name
        assert spec.admin_only == (name in ADMIN_ONLY), name


def test_rpc_requests_through_rpcapi(harness):
    campaign(harness, "rpc")
    assert harness.ledger.sent["rpc"] >= EXAMPLES["rpc"] * 0.9


def test_rpc_broken_envelopes(harness):
    campaign(harness, "rpc_envelope")
    assert harness.ledger.sent["rpc_envelope"] >= EXAMPLES["rpc_envelope"] * 0.9


def test_admin_socket_requests(harness):
    campaign(harness, "admin")
    assert harness.ledger.sent["admin"] >= EXAMPLES["admin"] * 0.9


def test_admin_socket_raw_lines(harness):
    campaign(harness, "admin_raw")
    assert harness.ledger.sent["admin_raw"] >= EXAMPLES["admin_raw"] * 0.9


def test_all_payloads_answered_and_only_valid_builds_defined(harness):
    for name in CAMPAIGNS:
        campaign(harness, name)
    ledger = harness.ledger
    total = sum(ledger.sent.values())
    print(f"\ntotal {total} payloads: {dict(ledger.sent)}")
    assert total >= MIN_TOTAL
    # The right answers were exercised, not only refusals.
    builds_ok = len(ledger.accepted)
    assert builds_ok >= 100, builds_ok
    for channel in CAMPAIGNS:
        assert ledger.outcomes[(channel, OK)] >= 20, (channel, ledger.outcomes)
        assert ledger.outcomes[(channel, INVALID)] >= 100, (channel, ledger.outcomes)
    # Clean up what the valid builds made, through the agent.
    for uuid in sorted(ledger.live):
        answer = harness.rpc_call("delete_instance", {"instance_uuid": uuid})
        harness.judge("rpc", "delete_instance", {"instance_uuid": uuid}, expect(OK), answer)
    assert ledger.live == {}
    check_hypervisor(harness)
    assert set(harness.domains()) == {FOREIGN.name}
    harness.check_alive()
    check_log(harness)


# -- regressions: what the fuzz found ------------------------------------------


def test_log_file_escapes_lone_surrogates(tmp_path):
    """A request's text reaches the log; a lone surrogate once cost the line and a traceback."""
    handler = log.make_handler(str(tmp_path / "agent.log"))
    failed: list[logging.LogRecord] = []
    handler.handleError = failed.append  # type: ignore[method-assign]
    logger = logging.getLogger("compute_agent.test_hostile_input")
    logger.addHandler(handler)
    try:
        logger.warning("unknown argument %s", "x\udcffy")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert failed == []
    assert "unknown argument x\\udcffy" in (tmp_path / "agent.log").read_text("utf-8")


@pytest.mark.parametrize(
    "refuse",
    [
        lambda name: Dispatcher(None, None).call("ping", {name: 1}, ActionSource.RPC),
        lambda name: protocol.parse_request(json.dumps({"method": "ping", name: 1}).encode()),
        lambda name: protocol.parse_request(json.dumps({"method": name, "args": 1}).encode()),
        lambda name: BuildRequest.parse(
            {"uuid": str(uuidlib.uuid4()), "name": "a", "vcpus": 1, "memory_mb": 64, name: 1}
        ),
    ],
    ids=["dispatcher-argument", "admin-field", "admin-method", "build-field"],
)
def test_names_a_client_chose_cannot_break_an_error_message(refuse):
    """Argument, field and method names are echoed escaped: one line, always encodable."""
    with pytest.raises(exception.InvalidInput) as info:
        refuse("evil\nERROR forged line \udcff\x1b[2J")
    message = str(info.value)
    assert message.isprintable(), message
    assert "evil\\nERROR forged line \\udcff\\x1b[2J" in message


def test_rpc_method_names_cannot_forge_log_lines(harness):
    first = len(harness.records.records)
    answer = harness.rpc_call("ping\nERROR forged", {})
    assert answer.outcome == INVALID
    logged = [r.getMessage() for r in harness.records.records[first:]]
    assert any("ping\\nERROR forged" in m for m in logged), logged
    assert all(m.isprintable() for m in logged if "forged" in m), logged


def test_rpc_null_args_mean_no_arguments(harness):
    """oslo's own dispatcher failed on ``"args": null`` with an AttributeError and traceback."""
    answer = harness.rpc_envelope({"method": "ping", "args": None, "version": "1.0"})
    assert answer == Answer(OK, {"host": harness.host, "version": __version__})
    answer = harness.rpc_envelope({"method": "get_instance_info", "args": None, "version": "1.0"})
    assert answer.outcome == INVALID and "missing argument(s) instance_uuid" in answer.message
