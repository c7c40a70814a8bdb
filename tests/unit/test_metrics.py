"""The metrics: the registry, the instance index, the collector's text, the HTTP server."""

from __future__ import annotations

import math
import socket
import urllib.error
import urllib.request
import uuid as uuidlib
from collections import Counter
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from compute_agent import exception, green
from compute_agent.dispatch import Dispatcher
from compute_agent.exception import MetricsBindError
from compute_agent.manager import ComputeManager
from compute_agent.metrics import registry
from compute_agent.metrics import server as server_mod
from compute_agent.metrics.collector import AgentCollector
from compute_agent.metrics.instances import InstanceIndex
from compute_agent.metrics.server import MetricsServer
from compute_agent.service import NodeService
from compute_agent.states import ActionSource, PowerState
from compute_agent.virt.fake import FakeDriver
from tests.helpers import eventually
from tests.unit.hammer import THREADS, WRITES, hammer

# Quotes and a backslash, which a build accepts, and a line break, which only a
# row written by something else could hold: the characters the text format escapes.
HOSTILE = 'a "b" \\ c'


def samples(text: str, name: str) -> list:
    return [
        s
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def test_histogram_buckets_are_cumulative_and_inclusive():
    h = registry.Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 2.0):
        h.observe(value)
    buckets, count, total = h.snapshot()
    assert buckets == [(0.1, 2), (1.0, 3), (math.inf, 4)]
    assert count == 4 and total == pytest.approx(2.65)


def test_libvirt_call_names_are_the_codes_own():
    def _all_stats_native() -> None: ...

    assert registry.libvirt_call_name(_all_stats_native) == "all_stats"
    assert registry.libvirt_call_name(object()) == "call"


def rec(uuid: str, vm_state: str = "active") -> SimpleNamespace:
    return SimpleNamespace(
        uuid=uuid, display_name="vm", vm_state=vm_state, power_state="running", vcpus=1
    )


def test_index_keeps_operations_newer_than_a_list():
    index = InstanceIndex()
    index.replace([rec("a"), rec("b")], loaded_at=0.0)
    loaded_at = figures_clock()
    index.remove("a")  # deleted after the list below was read
    index.update(rec("c"))  # built after it
    index.update(rec("b", "stopped"))
    index.replace([rec("a"), rec("b")], loaded_at=loaded_at)
    snap = index.snapshot()
    assert set(snap) == {"b", "c"}
    assert snap["b"].vm_state == "stopped"
    # A list read after the operations is taken as it is.
    index.replace([rec("a")], loaded_at=figures_clock())
    assert set(index.snapshot()) == {"a"}


def figures_clock() -> float:
    from compute_agent import green

    return green.monotonic()


@pytest.fixture
def agent(conf, sqlite_db):
    conf.set_override("stats_interval", 0, group="compute")
    conf.set_override("lifecycle_event_delay", 0, group="libvirt")
    registry.reset()
    manager = ComputeManager(conf, sqlite_db, FakeDriver())
    service = NodeService(conf, sqlite_db, components=[manager])
    service.start()
    yield SimpleNamespace(
        manager=manager,
        service=service,
        dispatcher=Dispatcher(manager, service),
        collector=AgentCollector(service, manager),
    )
    service.stop()


def render(agent) -> str:
    server = MetricsServer("127.0.0.1", 0, agent.collector)
    return server.render().decode()


def test_collector_serves_instances_and_escapes_their_names(agent):
    uuid = str(uuidlib.uuid4())
    agent.dispatcher.call(
        "build_instance",
        {"instance": {"uuid": uuid, "name": HOSTILE, "vcpus": 2, "memory_mb": 128}},
        ActionSource.RPC,
    )
    agent.manager.stats.run()
    text = render(agent)
    assert 'name="a \\"b\\" \\\\ c"' in text  # escaped on the wire
    (info,) = [s for s in samples(text, "compute_agent_instance_info") if s.labels["uuid"] == uuid]
    assert info.labels["name"] == HOSTILE and info.value == 1
    assert info.labels["vm_state"] == "active" and info.labels["power_state"] == "running"
    (vcpus,) = samples(text, "compute_agent_instance_vcpus")
    assert vcpus.value == 2
    assert samples(text, "compute_agent_instance_stats_age_seconds")
    counts = {
        (s.labels["vm_state"], s.labels["power_state"]): s.value
        for s in samples(text, "compute_agent_instances")
    }
    assert counts == {("active", "running"): 1}
    (backend,) = samples(text, "compute_agent_concurrency_backend")
    assert backend.labels == {"backend": green.BACKEND} and backend.value == 1
    (ok,) = [
        s
        for s in samples(text, "compute_agent_requests_total")
        if s.labels["method"] == "build_instance"
    ]
    assert ok.labels == {"front": "rpc", "method": "build_instance", "outcome": "ok"}
    agent.dispatcher.call("delete_instance", {"instance_uuid": uuid}, ActionSource.CLI)
    assert uuid not in render(agent)
    other = rec(str(uuidlib.uuid4()))
    other.display_name = "two\nlines"
    agent.manager.instance_index.update(other)
    text = render(agent)
    assert 'name="two\\nlines"' in text
    (info,) = samples(text, "compute_agent_instance_info")
    assert info.labels["name"] == "two\nlines"


def test_requests_count_unknown_methods_under_one_label(agent):
    for method in ("no_such", "other", 7):
        with pytest.raises(exception.InvalidInput):
            agent.dispatcher.call(method, {}, ActionSource.CLI, admin=True)
    text = render(agent)
    (refused,) = samples(text, "compute_agent_requests_total")
    assert refused.labels == {"front": "admin", "method": "unknown", "outcome": "InvalidInput"}
    assert refused.value == 3


def test_server_answers_metrics_only(agent):
    server = MetricsServer("127.0.0.1", 0, agent.collector)
    server.start()
    base = f"http://127.0.0.1:{server.bound_port}"
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as reply:
            assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert b"compute_agent_libvirt_connected 1.0" in reply.read()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/other", timeout=10)
        assert err.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(f"{base}/metrics", data=b"x"), timeout=10)
        assert err.value.code == 405
        assert server.scrapes == 1
    finally:
        server.stop()


def test_a_taken_port_is_one_line(agent):
    first = MetricsServer("127.0.0.1", 0, agent.collector)
    first.listen()
    try:
        second = MetricsServer("127.0.0.1", first.bound_port, agent.collector)
        with pytest.raises(MetricsBindError, match="Address already in use"):
            second.listen()
    finally:
        first.stop()


def test_a_sync_write_shows_at_once(agent, conf):
    """A state the power sync records reaches the series without a statistics cycle."""
    uuid = str(uuidlib.uuid4())
    built = agent.dispatcher.call(
        "build_instance",
        {"instance": {"uuid": uuid, "name": "vm", "vcpus": 1, "memory_mb": 64}},
        ActionSource.RPC,
    )
    domain = agent.manager.db.instance_get(uuid).domain_name
    assert built["power_state"] == "running"
    agent.manager.driver.set_state(domain, PowerState.PAUSED, emit=False)
    agent.dispatcher.call("sync_power_states", {"instance_uuid": uuid}, ActionSource.CLI)
    assert agent.manager.db.instance_get(uuid).power_state == "paused"
    (info,) = samples(render(agent), "compute_agent_instance_info")
    assert info.labels["power_state"] == "paused"
    counts = {
        (s.labels["vm_state"], s.labels["power_state"]): s.value
        for s in samples(render(agent), "compute_agent_instances")
    }
    assert counts == {("active", "paused"): 1}


def scrape(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        reply.read()
        return reply.status


def test_slow_and_silent_clients_never_take_the_scrape_slots(agent):
    """Slowloris: clients that send nothing or trickle hold no scrape slot."""
    server = MetricsServer("127.0.0.1", 0, agent.collector)
    server.start()
    port = server.bound_port
    slow = []
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as garbage:
            garbage.sendall(b"\x00\x01 hello\r\n\r\n")
            assert garbage.recv(100).startswith(b"HTTP/1.0 400")
        for n in range(3 * server_mod.MAX_CLIENTS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if n % 2:
                sock.sendall(b"GE")  # a request that is still coming
            slow.append(sock)
        # Before: each took a slot for READ_TIMEOUT_S (for ever while it trickled): 503.
        assert scrape(port) == 200
        for sock in slow:
            sock.sendall(b"T")
        assert scrape(port) == 200
    finally:
        for sock in slow:
            sock.close()
        server.stop()


class _BigBody:
    """A collector whose text is larger than the kernel's buffers on loopback take."""

    def __init__(self, megabytes: int) -> None:
        self.text = "x" * (megabytes * 1_000_000)

    def collect(self):
        return iter(())

    def instance_text(self) -> str:
        return self.text


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_scrapers_that_never_read_hold_no_scrape_thread(monkeypatch):
    """Eight scrapers of an 8 MB body that never read held the four scrape threads
    WRITE_TIMEOUT_S each: a scrape beside them waited two rounds of it (19.6 s at 10 s,
    bench.metrics_attack nonreader). The accept thread now sends what they leave."""
    monkeypatch.setattr(server_mod, "WRITE_TIMEOUT_S", 4.0)
    server = MetricsServer("127.0.0.1", 0, _BigBody(8))
    server.start()
    port = server.bound_port
    before = _open_fds()
    hold = []
    try:
        for _ in range(2 * server_mod.MAX_CLIENTS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            hold.append(sock)
        assert eventually(lambda: server.scrapes == len(hold), 10, "the eight renders")
        started = green.monotonic()
        assert scrape(port) == 200
        took = green.monotonic() - started
        assert took < 2.0, f"a scrape waited {took:.1f} s behind scrapers that never read"
        # Each non-reader's reply is dropped at its deadline: the server's side is closed.
        assert eventually(lambda: _open_fds() == before + len(hold), 15, "the replies dropped")
    finally:
        for sock in hold:
            sock.close()
        server.stop()


def test_a_trickling_request_is_cut_at_its_deadline(agent, monkeypatch):
    """READ_TIMEOUT_S bounds the whole request, not each read of it."""
    monkeypatch.setattr(server_mod, "READ_TIMEOUT_S", 1.0)
    server = MetricsServer("127.0.0.1", 0, agent.collector)
    server.start()
    started = figures_clock()
    try:
        with socket.create_connection(("127.0.0.1", server.bound_port), timeout=10) as sock:
            sock.settimeout(0.2)
            closed = False
            for byte in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 200:
                try:
                    sock.sendall(bytes([byte]))
                    closed = sock.recv(100) == b""
                except TimeoutError:
                    continue
                except OSError:  # reset by the server
                    closed = True
                if closed or figures_clock() - started > 30:
                    break
            assert closed, "the server kept a trickling client past its deadline"
            assert figures_clock() - started < 20
    finally:
        server.stop()


def test_scrapes_beyond_the_queue_get_503(agent, monkeypatch):
    """Scrapes being rendered hold the threads, then the queue fills; one more is refused."""
    monkeypatch.setattr(server_mod, "MAX_QUEUED", 2)
    release = green.native_event()
    text = agent.collector.instance_text

    def slow_text() -> str:
        release.wait(20)
        return text()

    agent.collector.instance_text = slow_text
    server = MetricsServer("127.0.0.1", 0, agent.collector)
    server.start()
    port = server.bound_port
    extra = 3
    busy = []
    replies: dict[int, bytes] = {}

    def refused() -> int:
        for n, sock in enumerate(busy):
            if n not in replies:
                try:
                    replies[n] = sock.recv(100)
                except TimeoutError:
                    pass
        return sum(r.startswith(b"HTTP/1.0 503") for r in replies.values())

    try:
        # While the renders are held, at most MAX_CLIENTS + MAX_QUEUED are kept.
        for _ in range(server_mod.MAX_CLIENTS + server_mod.MAX_QUEUED + extra):
            sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            sock.settimeout(0.05)
            busy.append(sock)
        assert eventually(lambda: refused() >= extra, 10, "503s")
        release.set()
        for sock in busy:
            sock.settimeout(20)
        for n, sock in enumerate(busy):
            if n not in replies:
                replies[n] = sock.recv(100)
        heads = Counter(r[:12] for r in replies.values())
        assert heads[b"HTTP/1.0 503"] >= extra, heads
        assert heads[b"HTTP/1.0 200"] + heads[b"HTTP/1.0 503"] == len(busy), heads
        assert scrape(port) == 200
    finally:
        release.set()
        for sock in busy:
            sock.close()
        server.stop()


def test_a_scrape_gets_through_a_flood(agent):
    """Flooding clients that retry at once never starve a scrape; scrapes share renders."""
    text = agent.collector.instance_text
    renders = []

    def slow_text() -> str:
        renders.append(1)
        green.native_sleep(0.05)  # a host with many instances
        return text()

    agent.collector.instance_text = slow_text
    server = MetricsServer("127.0.0.1", 0, agent.collector)
    server.start()
    port = server.bound_port
    stop = green.native_event()
    served = []

    def flood() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                    served.append(sock.recv(12))
                    while sock.recv(65536):
                        pass
            except OSError:
                pass

    clients = [green.spawn(flood) for _ in range(3 * server_mod.MAX_CLIENTS)]
    try:
        eventually(lambda: len(served) > 20, 20, "the flood under way")
        # Before: 4 threads, a 503 for each request past them; the flood's
        # retries took every free thread first.
        assert [scrape(port) for _ in range(3)] == [200, 200, 200]
        assert len(renders) < len(served)  # shared
    finally:
        stop.set()
        for client in clients:
            client.wait()
        server.stop()


def test_counters_count_every_increment_from_many_threads():
    family = registry.CounterFamily(("kind",), preset=[("preset",)])

    def work(i: int) -> None:
        mine = (f"thread-{i}",)
        for _ in range(WRITES):
            family.inc(("shared",))
            family.inc(mine, 2)
            family.inc(("preset",), 0.5)

    hammer(work)
    values = dict(family.items())
    assert values.pop(("shared",)) == THREADS * WRITES
    assert values.pop(("preset",)) == THREADS * WRITES * 0.5
    assert values == {(f"thread-{i}",): 2 * WRITES for i in range(THREADS)}


def test_histograms_count_every_observation_from_many_threads():
    single = registry.Histogram((1.0, 2.0))
    family = registry.HistogramFamily(("kind",), buckets=(1.0, 2.0))
    torn: list[tuple[int, float]] = []

    def work(i: int) -> None:
        for n in range(WRITES):
            single.observe(0.5 if n % 2 else 1.5)
            family.observe(("shared",), 2.5)
            family.observe((f"thread-{i % 2}",), 0.5)  # pairs of threads create each child
            if i == 0 and n % 100 == 0:
                # A reader sees buckets, count and sum of one moment.
                buckets, count, total = family.items()[0][1].snapshot()
                if total != count * 2.5 or buckets[-1][1] != count:
                    torn.append((count, total))

    hammer(work)
    assert torn == []
    buckets, count, total = single.snapshot()
    assert buckets == [
        (1.0, THREADS * WRITES // 2),
        (2.0, THREADS * WRITES),
        (math.inf, THREADS * WRITES),
    ]
    assert (count, total) == (THREADS * WRITES, THREADS * WRITES // 2 * (0.5 + 1.5))
    children = {values: child.snapshot() for values, child in family.items()}
    assert children[("shared",)][1:] == (THREADS * WRITES, THREADS * WRITES * 2.5)
    for half in ("thread-0", "thread-1"):
        assert children[(half,)][1:] == (THREADS // 2 * WRITES, THREADS // 2 * WRITES * 0.5)
