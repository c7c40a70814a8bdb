"""Concurrency: the one API the agent spawns, waits, sleeps and locks through.

Two implementations, chosen once at import (:mod:`compute_agent.concurrency`
says how: ``COMPUTE_AGENT_CONCURRENCY``, else ``[DEFAULT] concurrency_backend``):
``eventlet`` (the default, ``_green_eventlet``) and ``threads`` (native
threads, ``_green_threads``; the process then never loads eventlet or
greenlet, and oslo.service runs its threading backend). No other module
imports either, nor relies on a behaviour of one of them.

The API:

- ``spawn(fn, *args, name=...)`` -> :class:`Task`; ``call_later(seconds, fn,
  *args, name=...)`` -> Task, cancelled before it starts it never runs;
  ``submit(fn, *args, name=...)`` -> Task whose outcome only ``result()``
  reports; ``start_soon(fn, *args, name=...)`` -> Task, whose caller does
  not wait for a new thread to run (under threads ``spawn`` does).
  ``Task``: ``name``, ``cancel()``, ``done()``, ``result(timeout)``
  (the return value; the work's exception, :data:`Cancelled`, or
  ``TimeoutError``, after which the work goes on: "spawn + wait with a
  deadline" is ``submit(...).result(timeout)``), ``add_done_callback(fn)``
  (``fn(task)`` once), ``wait()``. ``kill``/``dead``/``spawn_after`` are
  older names kept for tests and bench.
- ``Event``, ``Future``, ``Semaphore`` (also the lock: ``Semaphore(1)``),
  ``Pool``; ``sleep``, ``yield_now``; ``current_name``/``name_current``.
- ``execute(fn)``/``proxy(obj)`` run blocking C calls (libvirt) off the hub,
  and the ``native_*`` names give OS-level threads, locks and queues.
- ``wake_on_signals()``: a signal handler's task runs at once (under eventlet
  the hub's poll would otherwise sleep on until its next timer).
- ``recv_by(sock, size, deadline)``/``send_by(sock, data, deadline)``: socket
  I/O with a deadline (TimeoutError past it); under threads what is ready
  moves without giving up the GIL, where each system call of the socket
  module is a wait for the GIL behind the busy threads; ``peek(sock, size)``:
  what the peer sent and nobody read yet, left unread, never waiting.

Invariants callers rely on:

- Cancellation is cooperative: ``cancel()`` raises :data:`Cancelled` inside
  the task at its next switch point (``sleep``, ``yield_now``, a wait on an
  ``Event``/``Future``/``Task``, a ``Semaphore`` acquire). Catch
  ``Cancelled`` only to clean up, and re-raise it. When ``cancel`` returns
  is not part of the API (eventlet runs the task to its next switch point
  first, threads return at once): code that needs the task to have ended,
  its clean-up done, waits for it (``result()``); a task blocked in a C
  call sees the cancel only when the call returns.
- No order is promised: eventlet happens to start tasks in the order
  spawned and run each until a switch point, threads run them in parallel
  (bar the GIL), in any order. Code that needs an order makes it explicit
  (a FIFO of tickets, an ``Event``), so that it holds on both; a yield is
  for fairness on the hub, never for correctness.
- Shared state touched by more than one task (dicts, sets, counters changed
  in several steps) is guarded by a ``native_lock()`` held briefly and never
  across a switch point. Under eventlet a task is never preempted between
  switch points (I/O, the calls above), so such a lock is never contended
  and never switches; under threads it is what makes the change atomic.
- Never block the hub: a blocking C call goes through ``execute``/``proxy``
  (under threads these are direct calls; blocking one thread is fine).
- Under threads there is no hub: ``monkey_patch`` does nothing and the hub-lag
  monitor's switch tracer is not available (``set_switch_tracer`` returns
  None and installs nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from compute_agent import concurrency

BACKEND_VARIABLE = concurrency.VARIABLE
try:
    _CHOSEN = concurrency.chosen().backend
except concurrency.BackendChoiceError as exc:
    raise ImportError(str(exc)) from None

if _CHOSEN == "threads" and not TYPE_CHECKING:
    concurrency.prepare_threads()
    from compute_agent._green_threads import *  # noqa: F403
else:
    from compute_agent._green_eventlet import *  # noqa: F403
