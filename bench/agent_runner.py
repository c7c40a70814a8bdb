"""One agent of ``bench.fanout``, in a process of its own.

``python -m bench.agent_runner --host H --db-url URL --exchange EX [--latency S]``

Wired as ``compute-agent`` wires itself (NodeService, ComputeManager, the
RPC server and its Dispatcher; no admin socket), with a fake driver holding
one running domain for each of the host's rows in the database, so a sync
finds everything in agreement (the steady state). Only an RPC request
syncs: the periodic sync and statistics sampling are off. It prints one
JSON line once it serves, and stops when its stdin closes or on SIGTERM or SIGINT.
"""

from compute_agent import green

green.monkey_patch()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from bench.rpc_common import TRANSPORT_URL, build_conf  # noqa: E402
from compute_agent.db import migration  # noqa: E402
from compute_agent.db.api import Database  # noqa: E402
from compute_agent.dispatch import Dispatcher  # noqa: E402
from compute_agent.manager import ComputeManager  # noqa: E402
from compute_agent.rpc.server import RPCServer  # noqa: E402
from compute_agent.service import NodeService  # noqa: E402
from compute_agent.states import PowerState  # noqa: E402
from compute_agent.virt.fake import FakeDriver  # noqa: E402


def _watch_stdin(service: NodeService) -> None:
    """Stop the service when stdin closes (the benchmark ended or died)."""
    queue = green.NativeQueue()

    def read() -> None:
        for _ in sys.stdin:
            pass
        queue.put("eof")

    green.native_thread(read, name="stdin")
    queue.get()
    service.request_stop("stdin closed")


class _LagWarnings(logging.Handler):
    """Keeps the hub-lag monitor's warnings (each names the greenthread that ran longest)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.agent_runner")
    parser.add_argument("--host", required=True)
    parser.add_argument("--db-url", required=True)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--url", default=TRANSPORT_URL)
    parser.add_argument("--latency", type=float, default=0.0, help="get_info latency, s")
    parser.add_argument("--pool-size", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    started = green.monotonic()

    conf = build_conf(
        args.host,
        args.exchange,
        groups={
            "compute": {"sync_power_state_interval": -1, "stats_interval": -1},
            "database": {"connection": args.db_url, "pool_size": args.pool_size},
        },
        transport_url=args.url,
        graceful_shutdown_timeout=5,
    )
    db = Database(conf.database.connection, conf.database.pool_size)
    migration.check_schema(db)
    driver = FakeDriver(method_latency={"get_info": args.latency})
    rows = db.instance_get_all_by_host(args.host)
    for inst in rows:
        driver.add_domain(inst.domain_name, inst.uuid, PowerState.RUNNING)
    manager = ComputeManager(conf, db, driver)
    service = NodeService(conf, db, components=[manager])
    rpc = RPCServer(conf, Dispatcher(manager, service))
    service.components.append(rpc)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: service.request_stop(signal.Signals(signum).name))
    try:
        service.start()
        if not rpc.serving.wait(60):
            print(json.dumps({"error": "RPC server did not start within 60 s"}), flush=True)
            return 1
        green.spawn(_watch_stdin, service, name="stdin-watch")
        ready = {
            "ready": args.host,
            "instances": len(rows),
            "startup_s": green.monotonic() - started,
        }
        lag_at_ready = service.lag_monitor.statistics()
        lag_warnings = _LagWarnings()
        logging.getLogger("compute_agent.hub_monitor").addHandler(lag_warnings)
        print(json.dumps(ready), flush=True)
        service.wait()
        # Hub lag while serving (max_s counts only if it grew after start-up).
        lag = service.lag_monitor.statistics()
        served = {
            "stopped": args.host,
            "hub_lag_max_s": lag.max_s if lag.max_s > lag_at_ready.max_s else None,
            "hub_lag_p99_s": lag.p99_s,
            "hub_lag_warnings": lag_warnings.messages,
        }
    finally:
        service.stop()
    print(json.dumps(served), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
