"""The libvirt driver against libvirt's real test driver, on a host of 300 domains."""

import uuid

import libvirt
import pytest

from compute_agent import exception, green
from compute_agent.states import PowerState
from compute_agent.virt.libvirt import domain_xml
from compute_agent.virt.libvirt.driver import LibvirtDriver
from compute_agent.virt.spec import DomainSpec
from tests.libvirt_fixtures import Inst, kill_connection, libvirt_conf, make_host

COUNT = 300


@pytest.fixture
def host(tmp_path):
    return make_host(tmp_path / "node.xml", COUNT)


@pytest.fixture
def driver(host):
    uri, _ = host
    drv = LibvirtDriver(libvirt_conf(uri))
    drv.init_host("h")
    yield drv
    drv.cleanup_host()


def inst(d) -> Inst:
    return Inst(d.uuid, d.name)


def _forbid(monkeypatch, *names):
    def refuse(*_a, **_k):
        raise AssertionError("listing domains is not allowed here")

    for name in names:
        monkeypatch.setattr(libvirt.virConnect, name, refuse)


def test_instance_exists_is_one_lookup_never_a_listing(driver, host, monkeypatch):
    _, domains = host
    _forbid(monkeypatch, "listAllDomains", "listDomainsID", "listDefinedDomains")
    assert driver.instance_exists(inst(domains[7]))
    assert not driver.instance_exists(Inst(str(uuid.uuid4()), "instance-missing"))


def test_get_info_reports_each_state(driver, host):
    _, domains = host
    for d in domains[:12]:
        info = driver.get_info(inst(d))
        assert info.state is d.state
        assert info.max_mem_kb == 64 * 1024 and info.num_cpu == 1


def test_foreign_domain_is_never_ours(driver, host):
    _, domains = host
    impostor = Inst(str(uuid.uuid4()), domains[0].name)
    with pytest.raises(exception.ForeignDomain, match="not ours"):
        driver.get_info(impostor)
    with pytest.raises(exception.ForeignDomain):
        driver.instance_exists(impostor)
    with pytest.raises(exception.ForeignDomain):
        driver.destroy(impostor)
    assert driver.instance_exists(inst(domains[0]))  # the real owner's domain is intact


def test_counting_does_not_list(driver, monkeypatch):
    _forbid(monkeypatch, "listAllDomains", "listDomainsID", "listDefinedDomains")
    assert driver.get_num_instances() == COUNT


def test_list_domains(driver, host):
    _, domains = host
    listed = driver.list_domains()
    assert {(d.name, d.uuid) for d in listed} == {(d.name, d.uuid) for d in domains}


def test_bulk_states_equal_per_instance_states_in_one_call(driver, host, monkeypatch):
    _, domains = host
    calls = []
    real = libvirt.virConnect.getAllDomainStats

    def counting(self, *args, **kwargs):
        calls.append(args)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(libvirt.virConnect, "getAllDomainStats", counting)
    refs = [inst(d) for d in domains]
    missing = Inst(str(uuid.uuid4()), "instance-gone")
    bulk = driver.get_power_states([*refs, missing])
    assert len(calls) == 1
    assert bulk[missing.uuid] is None
    assert {r.uuid: bulk[r.uuid] for r in refs} == {r.uuid: driver.get_info(r).state for r in refs}


def test_bulk_leaves_foreign_domains_out(driver, host):
    _, domains = host
    impostor = Inst(str(uuid.uuid4()), domains[0].name)
    assert driver.get_power_states([impostor]) == {}


def test_operations(driver):
    spec = DomainSpec("instance-new", str(uuid.uuid4()), 2, 128)
    ref = Inst(spec.uuid, spec.name)
    driver.spawn(spec)
    info = driver.get_info(ref)
    assert info.state is PowerState.RUNNING and info.num_cpu == 2 and info.max_mem_kb == 128 * 1024
    driver.power_off(ref, timeout=2)
    assert driver.get_info(ref).state is PowerState.SHUTDOWN
    driver.power_on(ref)
    assert driver.get_info(ref).state is PowerState.RUNNING
    driver.reboot(ref)
    driver.reboot(ref, hard=True)
    assert driver.get_info(ref).state is PowerState.RUNNING
    driver.destroy(ref)
    assert not driver.instance_exists(ref)


def test_power_on_resumes_a_paused_domain(driver, host):
    _, domains = host
    paused = next(d for d in domains if d.state is PowerState.PAUSED)
    driver.power_on(inst(paused))
    assert driver.get_info(inst(paused)).state is PowerState.RUNNING


def test_failed_start_is_cleaned_up(driver, monkeypatch):
    def broken(self, *a):
        raise libvirt.libvirtError("cannot start: no memory")

    monkeypatch.setattr(libvirt.virDomain, "create", broken)
    spec = DomainSpec("instance-doomed", str(uuid.uuid4()), 1, 64)
    # A libvirt refusal reaches callers as a typed error, never a raw libvirtError.
    with pytest.raises(exception.HypervisorUnavailable, match="cannot start: no memory"):
        driver.spawn(spec)
    assert not driver.instance_exists(Inst(spec.uuid, spec.name))


@pytest.mark.hub_only("under threads every call runs in its caller's own thread")
def test_no_libvirt_call_ever_runs_on_the_hub(driver, host, monkeypatch):
    hub_thread = green.native_thread_id()
    on_hub = []

    def watch(cls):
        for name in dir(cls):
            attr = getattr(cls, name)
            if name.startswith("_") or not callable(attr):
                continue

            def wrapper(*a, __attr=attr, __name=name, **k):
                if green.native_thread_id() == hub_thread:
                    on_hub.append(f"{cls.__name__}.{__name}")
                return __attr(*a, **k)

            monkeypatch.setattr(cls, name, wrapper)

    watch(libvirt.virConnect)
    watch(libvirt.virDomain)
    _, domains = host
    refs = [inst(d) for d in domains[:20]]
    for r in refs:
        driver.instance_exists(r)
        driver.get_info(r)
    driver.get_power_states(refs)
    driver.get_num_instances()
    driver.list_domains()
    spec = DomainSpec("instance-hubtest", str(uuid.uuid4()), 1, 64)
    driver.spawn(spec)
    ref = Inst(spec.uuid, spec.name)
    driver.power_off(ref, timeout=1)
    driver.power_on(ref)
    driver.reboot(ref)
    driver.destroy(ref)
    assert on_hub == []


def test_virt_type_follows_the_connection(driver):
    assert driver.virt_type == "test"


def test_xml_is_built_from_validated_fields():
    spec = DomainSpec("instance-a.b_c-1", str(uuid.uuid4()), 2, 256)
    xml = domain_xml.build(spec, "qemu")
    assert domain_xml.parse_identity(xml) == (spec.name, spec.uuid)
    assert '<memory unit="MiB">256</memory>' in xml and "<vcpu>2</vcpu>" in xml


@pytest.mark.parametrize(
    "name",
    ["vm</name><devices>", "vm'", 'a"b', "a b", "", "-lead", "x" * 201, "é", "a/b", "a&b"],
)
def test_names_that_could_be_markup_are_refused(name):
    with pytest.raises(exception.InvalidInput, match="invalid domain name"):
        DomainSpec(name, str(uuid.uuid4()), 1, 64)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("uuid", "not-a-uuid", "not a UUID"),
        ("vcpus", 0, "vcpus"),
        ("vcpus", True, "integer"),
        ("memory_mb", "64", "integer"),
        ("memory_mb", 1, "memory_mb"),
    ],
)
def test_bad_fields_are_refused(field, value, message):
    values = dict(name="vm", uuid=str(uuid.uuid4()), vcpus=1, memory_mb=64)
    values[field] = value
    with pytest.raises(exception.InvalidInput, match=message):
        DomainSpec(**values)


def test_connection_loss_is_reported_and_repaired(driver, host):
    _, domains = host
    events = []
    driver.add_connection_listener(lambda up, why: events.append((up, why)))
    kill_connection(driver)  # the connection dies under us
    with pytest.raises(exception.HypervisorUnavailable):
        driver.get_info(inst(domains[0]))
    assert events and events[0][0] is False
    with pytest.raises(exception.HypervisorUnavailable):
        driver.get_num_instances()  # fails fast while down
    for _ in range(100):
        if driver.connected:
            break
        green.sleep(0.02)
    assert driver.connected
    assert events[-1][0] is True
    assert driver.get_info(inst(domains[0])).state is PowerState.RUNNING


def test_unreachable_libvirt_keeps_retrying(tmp_path):
    drv = LibvirtDriver(libvirt_conf(f"test:///{tmp_path}/missing.xml"))
    events = []
    drv.add_connection_listener(lambda up, why: events.append(up))
    with pytest.raises(exception.HypervisorUnavailable):
        drv.init_host("h")
    green.sleep(0.4)
    assert events[0] is False and not drv.connected
    drv.cleanup_host()


def _record_closes(driver, monkeypatch) -> list:
    """The raw connections the pool closes from now on."""
    closed: list = []
    pool = driver.host.pool
    real = pool._close_raw

    def close(connection):
        closed.append(connection.raw)
        real(connection)

    monkeypatch.setattr(pool, "_close_raw", close)
    return closed


def test_lost_connection_is_closed_only_after_its_calls_drain(driver, monkeypatch):
    closed = _record_closes(driver, monkeypatch)
    slow = green.spawn(driver.host.run, lambda raw: green.native_sleep(0.3) or raw)
    green.sleep(0.05)
    assert driver.host.inflight == 1
    driver.host._lost("test: connection dropped", driver.host.generation)
    green.sleep(0.1)
    assert closed == []  # a call is still running on it
    raw = slow.wait()
    for _ in range(100):
        if closed:
            break
        green.sleep(0.02)
    assert closed == [raw]  # closed by the call's own thread once it returned


def test_a_killed_waiter_does_not_let_its_running_call_be_closed_under(driver, monkeypatch):
    """A call's deadline or a cancelled sync kills the greenthread waiting on it;
    the native call goes on, so the lost connection must still wait for it
    (closing it under the call crashed the agent with SIGSEGV)."""
    closed = _record_closes(driver, monkeypatch)
    release = green.native_event()
    waiter = green.spawn(driver.host.run, lambda raw: release.wait(5))
    green.sleep(0.05)
    green.kill(waiter)  # the waiter gives up; its call still runs in the pool
    assert driver.host.inflight == 1
    driver.host._lost("test: connection dropped", driver.host.generation)
    green.sleep(0.2)
    assert closed == []
    release.set()
    for _ in range(100):
        if closed:
            break
        green.sleep(0.02)
    assert len(closed) == 1
    assert driver.host.inflight == 0


def test_a_loss_reported_twice_at_once_starts_one_reconnection(driver, monkeypatch):
    """A failing call and the close callback can report one loss together (from
    several threads under the threads backend): one down, one reconnection, one up."""
    changes = []
    driver.add_connection_listener(lambda up, why: changes.append(up))
    generation = driver.host.generation
    pool = driver.host.pool
    real_reset = pool.reset

    def slow_reset(new_generation):  # widens the window between the check and the bump
        green.native_sleep(0.05)
        return real_reset(new_generation)

    monkeypatch.setattr(pool, "reset", slow_reset)
    reports = [green.spawn(driver.host._lost, f"report {i}", generation) for i in range(8)]
    for report in reports:
        report.wait()
    for _ in range(200):
        if driver.connected:
            break
        green.sleep(0.02)
    assert driver.connected
    green.sleep(0.3)  # a second reconnection, if one was started, would have come by now
    assert changes == [False, True]
