"""The real RabbitMQ for the RPC tests: names unique to the run, and clean-up.

oslo.messaging names a server's queue ``<topic>.<host>`` whatever the
exchange, so two test runs at once (or a run and a stale agent) would share
queues if they shared host names. Each run therefore gets its own exchange
and its own host names, and deletes what it declared when done.
"""

from __future__ import annotations

import os
import pathlib
import uuid

import kombu
from oslo_config import cfg
from oslo_messaging import opts as messaging_opts

from compute_agent.conf import register_all
from compute_agent.rpc import TOPIC

TRANSPORT_URL = os.environ.get("COMPUTE_AGENT_TEST_RABBIT", "rabbit://guest:guest@127.0.0.1:5672/")
# Reply and fanout queues of a run expire this long after their last use.
TRANSIENT_TTL = 10


class RabbitRun:
    """Names for one test module's agents, and deleting their queues afterwards."""

    def __init__(self) -> None:
        self.run_id = uuid.uuid4().hex[:8]
        self.exchange = f"compute-agent-test-{self.run_id}"
        self.hosts: list[str] = []

    def host(self, name: str) -> str:
        """A host name unique to this run, e.g. ``host-a-1a2b3c4d``."""
        host = f"{name}-{self.run_id}"
        self.hosts.append(host)
        return host

    def conf_text(self) -> str:
        """The config lines an agent of this run needs."""
        return (
            f"[DEFAULT]\ntransport_url = {TRANSPORT_URL}\ncontrol_exchange = {self.exchange}\n"
            f"[oslo_messaging_rabbit]\nrabbit_transient_queues_ttl = {TRANSIENT_TTL}\n"
        )

    def conf(
        self, host: str = "rpc-client", config_file: pathlib.Path | None = None, **overrides: object
    ) -> cfg.ConfigOpts:
        """A parsed config for an in-process server or a client of this run.

        ``overrides`` are for ``[DEFAULT]`` only: the other groups' option
        objects are shared by every ConfigOpts, and so are their overrides,
        which would leak into later tests. Other groups go in ``config_file``.
        """
        c = cfg.ConfigOpts()
        register_all(c)
        c(["--config-file", str(config_file)] if config_file else [], project="compute-agent")
        c.set_override("host", host)
        c.set_override("transport_url", TRANSPORT_URL)
        c.set_override("control_exchange", self.exchange)
        c.set_override("periodic_fuzzy_delay", 0)
        for name, value in overrides.items():
            c.set_override(name, value)
        # oslo registers [oslo_messaging_rabbit] when it opens the transport.
        self.transient_ttl_override(c)
        return c

    @staticmethod
    def transient_ttl_override(c: cfg.ConfigOpts) -> None:
        group = "oslo_messaging_rabbit"
        for name, opts in messaging_opts.list_opts():
            if name == group:
                c.register_opts(opts, group=group)
        c.set_override("rabbit_transient_queues_ttl", TRANSIENT_TTL, group)

    def connection(self) -> kombu.Connection:
        return kombu.Connection(TRANSPORT_URL.replace("rabbit://", "amqp://", 1))

    def publish_raw(self, host: str, body: bytes | str, content_type: str) -> None:
        """Put ``body`` on ``host``'s server queue as is, bypassing oslo's envelope."""
        with self.connection() as conn:
            producer = conn.Producer(serializer=None)
            producer.publish(
                body,
                exchange=kombu.Exchange(self.exchange, type="topic", durable=False),
                routing_key=f"{TOPIC}.{host}",
                content_type=content_type,
                content_encoding="utf-8",
            )

    def cleanup(self) -> None:
        """Delete this run's server queues and exchange, and the shared topic queue if idle.

        Reply and fanout queues expire by themselves (TRANSIENT_TTL); the
        shared ``compute`` queue is left alone while anything uses it.
        """
        with self.connection() as conn:
            channel = conn.channel()
            for host in self.hosts:
                channel.queue_delete(f"{TOPIC}.{host}")
            try:
                channel.queue_delete(TOPIC, if_unused=True, if_empty=True)
            except conn.channel_errors:
                channel = conn.channel()  # in use by someone else: theirs to keep
            channel.exchange_delete(self.exchange)
