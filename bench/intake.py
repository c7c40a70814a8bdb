"""Bounded intake: a real agent flooded with casts or admin boots, pinged every 20 ms.

Scenarios (``python -m bench.intake [casts|builds|boots] [--runs N]``):

- ``casts``: 5000 ``stop_instance`` casts on unknown UUIDs, then 500
  ``build_instance`` casts;
- ``builds``: 1000 ``build_instance`` casts;
- ``boots``: 2000 boots over the admin socket, 8 at a time.

The agent is a ``compute-agent`` process (fake driver, SQLite, its own
exchange, hub-lag monitor every 10 ms, heartbeat every 1 s). A thread pings
its admin socket every 20 ms throughout. Printed per run: the agent's own
hub-lag max and heartbeat lateness, the pings' p99 and worst, the work
served, and how many log lines the refused casts cost.
"""

from __future__ import annotations

from compute_agent import green

green.monkey_patch()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from bench import flood  # noqa: E402
from bench.rpc_common import BenchRabbit  # noqa: E402

STOPS = 5000
STOP_BUILDS = 500
BUILDS = 1000
BOOTS = 2000
SERVE_TIMEOUT = 600.0


def _settled(agent: flood.AgentUnderTest, builds: int, casts: int) -> bool:
    figures = flood.agent_figures(agent.socket)
    b = figures["builds"]
    intake = figures["intake"]
    if intake is not None and intake["done"] < casts:
        return False
    if intake is None and casts and agent.count("refused") < casts - builds:
        return False
    return b["completed"] + b["failed"] >= builds and b["queued"] == 0 and b["running"] == 0


def run_scenario(
    name: str,
    rabbit: BenchRabbit,
    extra: dict[str, Any] | None = None,
    profile: str | None = None,
) -> dict:
    """One run of ``name`` on a fresh agent; its figures (``profile``: a py-spy SVG path)."""
    agent = flood.AgentUnderTest(
        rabbit.host(f"intake-{name}"), rabbit.exchange, rabbit.url, groups=extra
    )
    client = transport = None
    try:
        agent.wait_for("RPC serving")
        client, transport = flood.rpc_client(rabbit.client_conf(), agent.host)
        spy = flood.profile(agent.pid, profile) if profile else None
        pinger = flood.Pinger(agent.socket).start()
        time.sleep(1.0)
        started = time.monotonic()
        builds = casts = 0
        if name == "casts":
            casts += flood.send_casts(client, "stop_instance", flood.stop_payloads(STOPS))
            builds = flood.send_casts(client, "build_instance", flood.build_payloads(STOP_BUILDS))
            casts += builds
        elif name == "builds":
            payloads = flood.build_payloads(BUILDS)
            builds = casts = flood.send_casts(client, "build_instance", payloads)
        elif name == "boots":
            served = flood.admin_boots(agent.socket, BOOTS)
            builds = BOOTS
        sent_s = time.monotonic() - started
        flood.wait_until(lambda: _settled(agent, builds, casts), SERVE_TIMEOUT, 0.5)
        served_s = time.monotonic() - started
        time.sleep(1.5)  # a heartbeat after the flood
        pings = pinger.stop()
        figures = flood.agent_figures(agent.socket)
        result = {
            "scenario": name,
            "sent_s": round(sent_s, 2),
            "served_s": round(served_s, 2),
            **{k: figures[k] for k in ("hub_lag_max_s", "hub_lag_worst_offender")},
            "heartbeat_late_s": figures["heartbeat_max_lateness_s"],
            "ping": pings.summary(),
            "builds": figures["builds"],
            "refused_log_lines": agent.count("refused"),
            "warning_lines": agent.count(" WARNING "),
            "lag_lines": [line[-120:] for line in agent.lines if "hub lag" in line][:6],
        }
        if name == "boots":
            result["boots"] = served
        if spy is not None:
            flood.stop_profile(spy)
        return result
    finally:
        if transport is not None:
            transport.cleanup()
        agent.stop()


def _median(runs: list[dict], key: str, sub: str | None = None) -> str:
    values = [r[key][sub] if sub else r[key] for r in runs]
    med = statistics.median(values)
    return f"{med * 1000:.1f} ms ({min(values) * 1000:.1f}-{max(values) * 1000:.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", default=["casts", "builds", "boots"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", help="py-spy record the agent into this SVG path prefix")
    args = parser.parse_args(argv)
    rabbit = BenchRabbit("intake")
    try:
        for name in args.scenarios:
            runs = []
            for _ in range(args.runs):
                svg = f"{args.profile}-{name}-{len(runs)}.svg" if args.profile else None
                result = run_scenario(name, rabbit, profile=svg)
                print(json.dumps(result), flush=True)
                runs.append(result)
            print(
                f"{name}: hub lag max {_median(runs, 'hub_lag_max_s')}, "
                f"heartbeat late {_median(runs, 'heartbeat_late_s')}, "
                f"ping p99 {_median(runs, 'ping', 'p99_s')}, "
                f"ping max {_median(runs, 'ping', 'max_s')}, "
                f"served in {statistics.median(r['served_s'] for r in runs):.1f} s "
                "(median of {0}, range in brackets)".format(len(runs)),
                flush=True,
            )
    finally:
        rabbit.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
