"""The RPC server: the Dispatcher's public methods on topic ``compute``, server ``host``.

Every request goes through :meth:`Dispatcher.call`, the same door as the
admin socket, so RPC adds no validation of its own beyond the envelope.
What a caller gets back on failure is always one of the four public error
types (``compute_agent.rpc.PUBLIC_ERRORS``) with a readable message: any
other exception is logged here with its traceback and reported as
``HypervisorUnavailable`` (a failure of this host, worth retrying later).
A malformed request only ever fails that request.
"""

from __future__ import annotations

import logging
import random
import re
from typing import Any

import oslo_messaging
from oslo_config import cfg
from oslo_messaging import opts as messaging_opts
from oslo_messaging.rpc import server as oslo_rpc_server

from compute_agent import exception, green
from compute_agent.dispatch import Dispatcher
from compute_agent.exception import public_error
from compute_agent.intake import RefusalLog
from compute_agent.rpc import TOPIC, VERSION
from compute_agent.rpc.transport import get_transport, safe_url, transport_url_is_set
from compute_agent.states import ActionSource
from compute_agent.utils import add_counts, freeze_long_lived_objects, printable, request_args

LOG = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^\d{1,4}\.\d{1,4}$")

# The broker probe's pauses: doubled from the first up to the last, each
# jittered by 0.5-1.5x so a fleet whose broker came back does not knock at once.
PROBE_FIRST_PAUSE_S = 1.0
PROBE_MAX_PAUSE_S = 30.0
# A broker that answers closes the connections in milliseconds.
CLOSE_TIMEOUT_S = 3.0
# Nothing binds this routing key: the broker drops the probe.
PROBE_TOPIC = f"{TOPIC}.broker-probe"


class _ClosingChannelNoise(logging.Filter):
    """Drop amqp's warning about a frame the broker sent while the channel closed.

    Every clean stop draws one ("Received method (60, 30) during closing
    channel ... will be ignored"); it says nothing an operator can act on.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "during closing channel" not in record.getMessage()


logging.getLogger("amqp").addFilter(_ClosingChannelNoise())


def _expected(error: exception.ComputeAgentError) -> oslo_messaging.ExpectedException:
    """Wrap ``error`` so oslo replies with it without logging a traceback.

    The traceback is dropped on purpose: the caller gets the type and the
    message, never the server's stack.
    """
    # oslo formats exc_info with traceback.format_exception, which falls back
    # on the exception's own traceback and context: cut both.
    error.__traceback__ = None
    error.__context__ = error.__cause__ = None
    error.__suppress_context__ = True
    wrapped = oslo_messaging.ExpectedException()
    wrapped.exc_info = (type(error), error, None)
    return wrapped


# What a request may be refused with in the normal course: no traceback logged.
_REFUSALS = exception.EXPECTED


class _PublicMethodsOnly(oslo_messaging.RPCAccessPolicyBase):
    """Only the Dispatcher's RPC methods are callable; nothing else of the endpoint."""

    def is_allowed(self, endpoint: Any, method: str) -> bool:
        return method in endpoint.methods


class ComputeEndpoint:
    """Forwards each public method of the Dispatcher, taking keyword arguments.

    The methods are made on lookup from the Dispatcher's table, so a method
    added there is served here with no change. Arguments are passed on as a
    dict, so a missing, extra or misnamed one is reported by Dispatcher.call
    as InvalidInput rather than as a TypeError.
    """

    target = oslo_messaging.Target(version=VERSION)

    def __init__(self, dispatcher: Dispatcher, host: str) -> None:
        self.dispatcher = dispatcher
        self.host = host
        self.methods = frozenset(dispatcher.public(admin=False))

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the class lacks; dunders and oslo's probes
        # (oslo_rpc_server_ping) are not methods of ours.
        if name in self.__dict__.get("methods", ()):
            return lambda ctxt, /, **kwargs: self.call(name, kwargs)
        raise AttributeError(name)

    def call(self, method: str, kwargs: dict[str, Any]) -> Any:
        """Run one request; any failure leaves as an ExpectedException of a public type."""
        try:
            return self.dispatcher.call(method, kwargs, ActionSource.RPC)
        except _REFUSALS as exc:
            error = public_error(exc, self.host, method)
        except Exception as exc:  # logged with its traceback, sent as a public error
            LOG.exception("RPC %s failed unexpectedly", method)
            error = public_error(exc, self.host, method)
        raise _expected(error) from None


class RequestDispatcher(oslo_messaging.RPCDispatcher):
    """oslo's dispatcher, but every malformed request gets InvalidInput.

    oslo answers an unknown method with NoSuchMethod, a version it does not
    serve with UnsupportedVersion, and a non-string method or non-object
    arguments with whatever Python raises; the interface promises InvalidInput.
    It also logs each failure, naming casts, whose caller never hears of it.
    """

    def __init__(self, endpoint: ComputeEndpoint, refusals: RefusalLog | None = None) -> None:
        super().__init__([endpoint], None, _PublicMethodsOnly)
        self.endpoint = endpoint
        self.refusals = refusals if refusals is not None else RefusalLog(LOG)

    def dispatch(self, incoming: Any) -> Any:
        message = incoming.message
        method = message.get("method")
        kind = "call" if _expects_reply(incoming) else "cast"
        green.name_current(f"rpc-{_name(method)}")
        # oslo's worker takes the next request from its queue without
        # yielding: without this, one worker served a flood in one hub slice.
        green.yield_now()
        started = green.monotonic()
        try:
            self._check_envelope(message)
            try:
                result = super().dispatch(incoming)
            except oslo_messaging.NoSuchMethod:
                if method in self.endpoint.methods:
                    raise
                # The Dispatcher refuses it, saying which methods exist.
                self.endpoint.call(method, message["args"])
                raise AssertionError("unreachable: the endpoint refuses unknown methods") from None
            except oslo_messaging.UnsupportedVersion as exc:
                raise _expected(
                    exception.InvalidInput(
                        f"version {exc.version} is not served; this host serves {VERSION} "
                        f"(any 1.x up to it)"
                    )
                ) from None
        except oslo_messaging.ExpectedException as exc:
            error = exc.exc_info[1]
            level = logging.WARNING if kind == "cast" else logging.INFO
            self.refusals.refused(kind, _name(method), error, level)
            raise
        LOG.debug("RPC %s %s served in %.3f s", kind, _name(method), green.monotonic() - started)
        return result

    @staticmethod
    def _check_envelope(message: Any) -> None:
        method = message.get("method")
        if not isinstance(method, str) or not method:
            raise _expected(exception.InvalidInput("request has no method name"))
        try:
            # No arguments (None) as the Dispatcher and the admin socket take it;
            # oslo's own dispatcher would fail on None with an AttributeError.
            message["args"] = request_args(method, message.get("args"))
        except exception.InvalidInput as exc:
            raise _expected(exc) from None
        version = message.get("version", VERSION)
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise _expected(exception.InvalidInput(f"invalid version {str(version)[:20]!r}"))
        namespace = message.get("namespace")
        if namespace is not None:
            raise _expected(exception.InvalidInput(f"unknown namespace {str(namespace)[:40]!r}"))


def _expects_reply(incoming: Any) -> bool:
    # oslo gives every message a msg_id; the AMQP driver keeps the caller's
    # own, which a cast does not have, and the reply queue, which it lacks too.
    return bool(getattr(incoming, "orig_msg_id", None) or getattr(incoming, "reply_q", None))


def _name(method: Any) -> str:
    return printable(method)


def bound_prefetch(conf: cfg.ConfigOpts) -> int:
    """Take at most ``executor_thread_pool_size`` requests from the broker ahead of the workers.

    oslo's default prefetch, 0, takes every message the broker has: a flood
    of casts was pulled into the agent's memory at once, and a request sent
    after it could not overtake it anyway. Bounded, the flood waits in the
    broker. An operator's own ``[oslo_messaging_rabbit]
    rabbit_qos_prefetch_count`` is kept.
    """
    group = "oslo_messaging_rabbit"
    for name, opts in messaging_opts.list_opts():
        if name == group:
            conf.register_opts(opts, group=group)
    conf.set_default("rabbit_qos_prefetch_count", conf.executor_thread_pool_size, group)
    return int(conf[group].rabbit_qos_prefetch_count)


class _BoundedRPCServer(oslo_rpc_server.RPCServer):
    """oslo's RPC server with at most ``backlog`` requests taken in, and a yielding listener.

    oslo acknowledges a request as its worker takes it, so the broker's
    prefetch bounds nothing: a flood of 5000 casts moved into the agent's
    executor queue at once, and the garbage collector then walked every
    queued message (64 ms full collections). Here the listener waits for
    room before it hands on the next message, so the rest of a flood waits
    in the broker. It also yields after each message: it reads the
    broker's socket without yielding as long as data is there, and ran 0.3
    to 0.8 s per hub slice under a flood.
    """

    def __init__(self, *args: Any, backlog: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._room = green.Semaphore(backlog)
        self._count_lock = green.native_lock()
        self.in_flight = 0  # taken in, not yet processed

    def _on_incoming(self, incoming: Any) -> None:
        self._room.acquire()
        add_counts(self._count_lock, self, in_flight=1)
        try:
            super()._on_incoming(incoming)
        except BaseException:
            add_counts(self._count_lock, self, in_flight=-1)
            self._room.release()
            raise
        green.yield_now()

    def _process_incoming(self, incoming: Any) -> None:
        try:
            super()._process_incoming(incoming)
        finally:
            add_counts(self._count_lock, self, in_flight=-1)
            self._room.release()


class RPCServer:
    """Component: serve RPC while the service runs, if a transport_url is set.

    The connection is made in the background, because oslo retries a
    broker it cannot reach for ever, and the agent must run (sync, report)
    whether or not the broker is there.
    """

    def __init__(self, conf: cfg.ConfigOpts, dispatcher: Dispatcher) -> None:
        self.conf = conf
        self.dispatcher = dispatcher
        self.host: str = conf.host
        self.transport: oslo_messaging.Transport | None = None
        self.server: oslo_rpc_server.RPCServer | None = None
        self.serving = green.Event()
        self._starter: green.Task | None = None
        self._grace: float = conf.graceful_shutdown_timeout
        self.refusals: RefusalLog | None = None
        self._service: Any = None
        self.duplicate: str | None = None

    @property
    def enabled(self) -> bool:
        """True when an operator set transport_url (oslo's own default is ``rabbit://``)."""
        return transport_url_is_set(self.conf)

    def status(self) -> str:
        """For the service's status line (``systemctl status``)."""
        if not self.enabled:
            return "RPC disabled"
        if self.duplicate:
            return "RPC refused: duplicate host on the broker"
        return "RPC serving" if self.serving.is_set() else "RPC connecting"

    def start(self, service: Any) -> None:
        self._service = service
        if not self.enabled:
            LOG.info("RPC disabled: no [DEFAULT] transport_url")
            return
        prefetch = bound_prefetch(self.conf)
        self.transport = get_transport(self.conf)
        target = oslo_messaging.Target(topic=TOPIC, server=self.host, version=VERSION)
        endpoint = ComputeEndpoint(self.dispatcher, self.host)
        self.refusals = RefusalLog(LOG, self.conf.refusal_log_interval)
        self.server = _BoundedRPCServer(
            self.transport,
            target,
            RequestDispatcher(endpoint, self.refusals),
            green.RPC_EXECUTOR,
            backlog=self.conf.executor_thread_pool_size,
        )
        LOG.info(
            "RPC connecting to %s (exchange %s, topic %s, server %s, prefetch %d)",
            safe_url(self.conf.transport_url),
            self.conf.control_exchange,
            TOPIC,
            self.host,
            prefetch,
        )
        self._starter = green.spawn(self._start_server, name="rpc-start")

    def _answering_elsewhere(self) -> str | None:
        """Ping our own server name before consuming: who answers, if anyone does.

        This agent takes nothing from its queue yet, so an answer comes from
        another agent that uses the same host name on this broker; the two
        would take turns answering requests meant for one host. No answer
        within the timeout is the normal case.
        """
        timeout = self.conf.rpc_duplicate_check_timeout
        if not timeout:
            return None
        target = oslo_messaging.Target(topic=TOPIC, server=self.host, version=VERSION)
        # A transport of its own, closed here: the reply listener a call
        # leaves behind made the server's transport slow (1-2 s) to close
        # at stop. retry=None: like the server's own start, wait for the
        # broker, so the check is made whenever the agent comes to serve.
        transport = get_transport(self.conf)
        client = oslo_messaging.get_rpc_client(transport, target, timeout=timeout, retry=None)
        started = green.monotonic()
        try:
            answer = client.call({}, "ping")
        except oslo_messaging.MessagingTimeout:
            return None
        except Exception as exc:  # noqa: BLE001 - a check that cannot be made does not stop RPC
            LOG.warning("duplicate-host check on the broker not made: %s", exc)
            return None
        finally:
            transport.cleanup()
            LOG.debug("duplicate-host check took %.1f s", green.monotonic() - started)
        version = answer.get("version", "?") if isinstance(answer, dict) else "?"
        return (
            f"another compute-agent (version {version}) already answers RPC as server "
            f"{self.host} on {safe_url(self.conf.transport_url)}, exchange "
            f"{self.conf.control_exchange}: each host name must be unique on a broker"
        )

    def _wait_for_broker(self) -> None:
        """Return once the broker takes a message; until then try again after growing pauses.

        oslo.messaging retries a broker it cannot reach for ever, inside the
        call that connects (a listener's, a call's reply queue), and a native
        thread in there cannot be cancelled: started that way, an agent
        stopped before its broker came would keep one thread reconnecting
        for the rest of the process. The probe is a cast that gives up at
        once (retry=0) on a transport of its own, and the pauses between
        tries are this task's sleeps, where a cancel lands. Only a broker
        lost between the probe and the server's start leaves that window.
        """
        pause = PROBE_FIRST_PAUSE_S
        while True:
            transport = get_transport(self.conf)
            try:
                probe = oslo_messaging.get_rpc_client(
                    transport, oslo_messaging.Target(topic=PROBE_TOPIC), retry=0
                )
                probe.cast({}, "probe")
                return
            except Exception as exc:  # noqa: BLE001 - each kind of failure is waited out alike
                wait = pause * (0.5 + random.random())
                LOG.warning(
                    "RPC broker %s not reachable: %s: %s; trying again in %.1f s",
                    safe_url(self.conf.transport_url),
                    type(exc).__name__,
                    printable(exc, 200),
                    wait,
                )
            finally:
                transport.cleanup()
            green.sleep(wait)
            pause = min(pause * 2, PROBE_MAX_PAUSE_S)

    def _start_server(self) -> None:
        assert self.server is not None
        self._wait_for_broker()
        self.duplicate = self._answering_elsewhere()
        if self.duplicate:
            LOG.error("refusing to serve: %s; this agent stops", self.duplicate)
            if self._service is not None:
                self._service.exit_status = 1
                self._service.request_stop("duplicate host on the broker")
            return
        try:
            self.server.start()
        except Exception:
            LOG.exception("RPC server could not start; this host takes no RPC requests")
            return
        self.serving.set()
        freeze_long_lived_objects()
        LOG.info("RPC serving topic %s as server %s, version %s", TOPIC, self.host, VERSION)

    def _close(self, transport: oslo_messaging.Transport) -> None:
        """Disconnect, waiting at most CLOSE_TIMEOUT_S for the broker.

        Each connection's close waits for the broker's reply, for up to a
        minute on a broker that has gone silent (a stop took 121 s): the
        close goes on in a task of its own, and the agent stops without it.
        """
        closing = green.submit(transport.cleanup, name="rpc-close")
        try:
            closing.result(CLOSE_TIMEOUT_S)
        except TimeoutError:
            LOG.warning(
                "RPC connections not closed after %.1f s (broker not answering?); "
                "stopping without them",
                CLOSE_TIMEOUT_S,
            )
        except Exception as exc:  # noqa: BLE001 - stopping regardless
            LOG.warning("RPC connections did not close cleanly: %s", exc)

    def stop(self) -> None:
        """Stop taking requests, let those in flight finish (bounded), disconnect (bounded)."""
        if self.server is None:
            return
        if self._starter is not None and not self._starter.done():
            self._starter.cancel()  # still trying to reach the broker
        if self.serving.is_set():
            self.server.stop()
            drained = green.submit(self.server.wait, name="rpc-drain")
            try:
                drained.result(self._grace)
            except TimeoutError:
                running = self.server.in_flight
                if running:
                    LOG.warning(
                        "RPC requests still running after %.1f s (%d); stopping anyway",
                        self._grace,
                        running,
                    )
                else:
                    LOG.warning(
                        "RPC listener still reading from the broker after %.1f s "
                        "(broker not answering?); stopping anyway",
                        self._grace,
                    )
            except Exception as exc:  # noqa: BLE001 - stopping regardless
                LOG.warning("RPC server did not stop cleanly: %s", exc)
        if self.transport is not None:
            self._close(self.transport)
        if self.refusals is not None:
            self.refusals.stop()
        self.serving.clear()
        LOG.info("RPC stopped")
