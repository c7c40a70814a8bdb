"""How long loading a host's instances holds the hub, in one chunk and in chunks.

``Database.instance_get_all_by_host`` turns rows into objects LOAD_CHUNK at a
time with a yield in between. This loads 10,000 SQLite rows both ways with
the hub monitor's SliceTracer installed and reports the longest stretch the
loading greenthread ran without yielding, with Python's cyclic garbage
collector on (as the agent runs) and off (the loading code alone): a full
collection over tens of thousands of fresh objects is a stretch of its own.
"""

from __future__ import annotations

import gc

from bench.common import HOST, make_db, save, table
from compute_agent import green
from compute_agent.db import api
from compute_agent.hub_monitor import SliceTracer

COUNT = 10_000
ROUNDS = 3


def longest_slice(db: api.Database) -> tuple[float, int]:
    tracer = SliceTracer()
    green.set_switch_tracer(tracer)
    try:
        loaded = green.spawn(lambda: len(db.instance_get_all_by_host(HOST)), name="load").wait()
    finally:
        green.set_switch_tracer(None)
    return tracer.longest, loaded


def main() -> dict:
    db = make_db(COUNT)
    default = api.LOAD_CHUNK
    rows, data = [], {"count": COUNT, "rounds": ROUNDS, "results": {}}
    try:
        for label, chunk in (("one chunk", COUNT), (f"chunks of {default}", default)):
            api.LOAD_CHUNK = chunk
            worst = {}
            for collector in ("on", "off"):
                gc.collect()
                if collector == "off":
                    gc.disable()
                try:
                    slices = [longest_slice(db) for _ in range(ROUNDS)]
                finally:
                    gc.enable()
                assert all(loaded == COUNT for _, loaded in slices), slices
                worst[collector] = max(longest for longest, _ in slices)
            data["results"][label] = {
                f"longest_slice_gc_{k}_s": round(v, 4) for k, v in worst.items()
            }
            rows.append((label, f"{worst['on'] * 1000:.0f} ms", f"{worst['off'] * 1000:.0f} ms"))
    finally:
        api.LOAD_CHUNK = default
        db.dispose()
    print(f"{COUNT} instances on SQLite, worst of {ROUNDS} loads:")
    print(table(("load", "longest stretch, gc on", "gc off"), rows))
    save("instance_load", data)
    return data
