"""RPC under load: ping round trips over RabbitMQ, idle and during a full sync.

The agent runs in this process as ``compute-agent`` wires it (NodeService,
ComputeManager, the RPC server with its Dispatcher), green, on a SQLite
database of 1000 instances, with a fake driver whose ``get_info`` blocks a
native thread for 20 ms; default sync concurrency, source ``get_info``.
The caller is another process (``bench.rpc_client``, plain threads) on an
exchange and host name unique to the run. It sends 300 pings one after
another with nothing else going on, then pings back to back while this
process asks the agent, over RPC, for a full sync. A ping counts as
"during the sync" if it started and ended inside the sync call's window.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

from bench.common import make_db, ms, name_for, save, table, uuid_for
from bench.rpc_common import BenchRabbit, Child, build_conf, interrupts_to_main, stop_children
from compute_agent import green
from compute_agent.db.models import Instance
from compute_agent.dispatch import Dispatcher
from compute_agent.manager import ComputeManager
from compute_agent.rpc.server import RPCServer
from compute_agent.rpcapi import ComputeAPI
from compute_agent.service import NodeService
from compute_agent.states import PowerState
from compute_agent.utils import percentile
from compute_agent.virt.fake import FakeDriver

INSTANCES = 1000
GET_INFO_LATENCY = 0.020
IDLE_PINGS = 300
# Back-to-back pings before the sync starts and after it ends, so its whole
# window is covered.
MARGIN_S = 1.0
GOAL_RATIO = 2.0


def _figures(rtts: list[float]) -> dict[str, Any]:
    return {
        "pings": len(rtts),
        "p50_s": round(percentile(rtts, 0.50), 5),
        "p99_s": round(percentile(rtts, 0.99), 5),
        "max_s": round(max(rtts) if rtts else 0.0, 5),
    }


def _start_agent(rabbit: BenchRabbit) -> tuple[NodeService, RPCServer, FakeDriver, str]:
    host = rabbit.host("bench-rpcload")
    conf = build_conf(
        host,
        rabbit.exchange,
        groups={
            "compute": {
                "sync_power_state_interval": -1,  # only the sync we ask for
                "power_sync_source": "get_info",
                "stats_interval": -1,
            }
        },
        graceful_shutdown_timeout=5,
    )
    db = make_db(INSTANCES)
    with db.engine.begin() as conn:
        conn.execute(sa.update(Instance).values(host=host))
    driver = FakeDriver(method_latency={"get_info": GET_INFO_LATENCY})
    for i in range(INSTANCES):
        driver.add_domain(name_for(i), uuid_for(i), PowerState.RUNNING)
    # As compute_agent.cmd.agent.build_service wires it (without the admin socket).
    manager = ComputeManager(conf, db, driver)
    service = NodeService(conf, db, components=[manager])
    rpc = RPCServer(conf, Dispatcher(manager, service))
    service.components.append(rpc)
    service.start()
    if not rpc.serving.wait(30):
        service.stop()
        raise RuntimeError("the RPC server did not start within 30 s")
    return service, rpc, driver, host


def main() -> dict:
    with interrupts_to_main():
        return _run()


def _run() -> dict:
    rabbit = BenchRabbit("rpcload")
    service: NodeService | None = None
    client: Child | None = None
    api: ComputeAPI | None = None
    notes: list[str] = []
    try:
        service, _rpc, driver, host = _start_agent(rabbit)
        concurrency = service.conf.compute.sync_power_state_concurrency
        client = Child(
            "bench.rpc_client",
            ["--exchange", rabbit.exchange, "--host", host, "--idle", str(IDLE_PINGS)],
            "rpc-client",
        )
        ready = json.loads(client.readline())
        assert ready["phase"] == "idle-done", ready
        api = ComputeAPI(rabbit.client_conf(), timeout=120)
        green.sleep(MARGIN_S)
        calls_before = driver.calls["get_info"]
        t0 = green.monotonic()
        summary = api.sync_power_states(host)
        t1 = green.monotonic()
        get_info_calls = driver.calls["get_info"] - calls_before
        green.sleep(MARGIN_S)
        client.send("stop")
        done = json.loads(client.readline())
    finally:
        if client is not None:
            notes += stop_children([client])
        if api is not None:
            api.close()
        if service is not None:
            service.stop()
        notes += rabbit.cleanup()

    idle_rtts = [rtt for _, rtt in done["idle"]]
    load = done["load"]
    during = [rtt for start, rtt in load if start >= t0 and start + rtt <= t1]
    before = [rtt for start, rtt in load if start + rtt < t0]
    covered = bool(load) and load[0][0] <= t0 and load[-1][0] + load[-1][1] >= t1
    starts = [start for start, _ in load if t0 <= start <= t1]
    edges = [t0, *starts, t1]
    widest_gap = max(b - a for a, b in zip(edges, edges[1:], strict=False))
    # Pings over 20 ms, by when they started (s from the sync's start): are they the sync's?
    slow = {
        "idle": [[round(s - t0, 3), round(r, 4)] for s, r in done["idle"] if r > 0.020],
        "back_to_back": [[round(s - t0, 3), round(r, 4)] for s, r in load if r > 0.020],
    }
    idle = _figures(idle_rtts)
    sync = _figures(during)
    ratio = sync["p99_s"] / idle["p99_s"] if idle["p99_s"] else float("inf")
    ok = covered and bool(during) and ratio <= GOAL_RATIO and not done["errors"]
    data = {
        "instances": INSTANCES,
        "get_info_latency_s": GET_INFO_LATENCY,
        "sync_concurrency": concurrency,
        "client": "separate process (bench.rpc_client), native threads, one ping at a time",
        "idle": idle,
        "during_sync": sync,
        "back_to_back_before_sync": _figures(before),
        "sync_summary": summary,
        "sync_window_s": round(t1 - t0, 3),
        "sync_get_info_calls": get_info_calls,
        "window_covered": covered,
        "widest_gap_between_pings_s": round(widest_gap, 4),
        "pings_over_20ms": slow,
        "p99_ratio": round(ratio, 2),
        "errors": done["errors"],
        "cleanup_notes": notes,
        "goal_met": ok,
    }
    rows = [
        [
            "idle (one at a time)",
            idle["pings"],
            "-",
            ms(idle["p50_s"]),
            ms(idle["p99_s"]),
            ms(idle["max_s"]),
        ],
        [
            "back to back, in the second before the sync",
            data["back_to_back_before_sync"]["pings"],
            "-",
            ms(data["back_to_back_before_sync"]["p50_s"]),
            ms(data["back_to_back_before_sync"]["p99_s"]),
            ms(data["back_to_back_before_sync"]["max_s"]),
        ],
        [
            f"during full sync ({INSTANCES} x {GET_INFO_LATENCY * 1000:.0f} ms get_info)",
            sync["pings"],
            f"{t1 - t0:.2f} s",
            ms(sync["p50_s"]),
            ms(sync["p99_s"]),
            ms(sync["max_s"]),
        ],
    ]
    print(table(["ping", "pings", "sync window", "p50", "p99", "max"], rows))
    print(
        f"\nsync: {summary['checked']} checked, {summary['changed']} changed, "
        f"{summary['errors']} errors, duration_s {summary['duration_s']}; "
        f"window covered: {covered} (widest gap between pings {ms(widest_gap)}); "
        f"errors: {len(done['errors'])}"
    )
    print(
        f"goal (p99 during the sync <= {GOAL_RATIO:.0f}x idle): "
        f"{ratio:.2f}x, {'met' if ok else 'NOT met'}"
    )
    if notes:
        print("clean-up:", "; ".join(notes))
    save("rpc_load", data)
    return data
