"""benchmarks/snapshot_peak.py against a forward replay of random allocator traces."""
from __future__ import annotations

import random

import pytest

from benchmarks import snapshot_peak

TT = [{"filename": "/x/site-packages/torchtitan/models/attention.py", "line": 191, "name": "forward"}]
FL = [{"filename": "/repo/fused_loss/chunked.py", "line": 110, "name": "run"}]


def _snapshot(older: list[int], trace: list[dict]) -> dict:
    """A snapshot whose live blocks at the end are `older` plus what the trace left allocated."""
    live = {e["addr"]: e["size"] for e in trace if e["action"] == "alloc"}
    for e in trace:
        if e["action"] == "free_completed":
            live.pop(e["addr"])
    blocks = [{"size": s, "state": "active_allocated"} for s in older + list(live.values())]
    blocks.append({"size": 7, "state": "inactive"})  # cached, not allocated: must not count
    return {"segments": [{"address": 0, "blocks": blocks}], "device_traces": [[], trace]}


def test_peak_live_set_and_the_event_that_reached_it():
    trace = [dict(action="alloc", addr=1, size=500, frames=TT), dict(action="alloc", addr=2, size=300, frames=[]),
             dict(action="free_completed", addr=1, size=500), dict(action="free_completed", addr=2, size=300),
             dict(action="alloc", addr=3, size=50, frames=FL)]
    r = snapshot_peak.peak_report(_snapshot([100], trace))
    assert (r["peak_gib"] * 2**30, r["at"], r["older_gib"] * 2**30) == pytest.approx((900, 2, 100))
    assert r["reached_by"] == ("alloc", 300 / 2**20, "(no python frame)")
    assert [(round(g * 2**30), n) for g, n, _ in r["groups"]] == [(500, 1), (300, 1)]
    assert r["groups"][0][2] == "torchtitan/models/attention.py:191 forward"


@pytest.mark.parametrize("seed", [random.randrange(1 << 30) for _ in range(3)])
def test_random_traces_match_a_forward_replay(seed):
    rng = random.Random(seed)
    older = [rng.randrange(1, 1000) for _ in range(rng.randrange(0, 4))]
    trace, live, nxt = [], {}, 10
    for _ in range(rng.randrange(1, 200)):
        if live and rng.random() < 0.45:
            addr = rng.choice(sorted(live))
            trace.append(dict(action="free_requested", addr=addr, size=live[addr]))  # not yet freed
            trace.append(dict(action="free_completed", addr=addr, size=live.pop(addr)))
        else:
            live[nxt] = rng.randrange(1, 5000)
            trace.append(dict(action="alloc", addr=nxt, size=live[nxt], frames=rng.choice([TT, FL, []])))
            nxt += 1
    best, cur = sum(older), sum(older)
    for e in trace:
        cur += e["size"] if e["action"] == "alloc" else -e["size"] if e["action"] == "free_completed" else 0
        best = max(best, cur)
    r = snapshot_peak.peak_report(_snapshot(older, trace))
    assert r["peak_gib"] * 2**30 == pytest.approx(best), seed
    assert (r["older_gib"] + sum(g for g, _, _ in r["groups"])) * 2**30 == pytest.approx(best), seed
