#!/usr/bin/env python3
"""Where is the peak of a CUDA memory snapshot? (torchtitan `--profiling.enable_memory_snapshot`)

Replays the allocator trace of the busiest device backward from the blocks live at snapshot
time, finds the event after which the most memory was allocated, and prints what was live
then: the allocations made inside the trace window, grouped by their first torchtitan /
fused_loss / parallel / torch.optim / DTensor frame, largest first. Allocations older than the
trace window (parameters, optimizer states) show up only as a total.

    python3 -m benchmarks.snapshot_peak <dump>/memory_snapshot/iteration_1/rank0_memory_snapshot.pickle

Used for the TP=2 memory question in benchmarks/NOTES.md.
"""
from __future__ import annotations

import collections
import pickle
import sys

GiB = 2**30
OURS = ("torchtitan", "fused_loss", "/parallel/", "torch/optim", "torch/distributed/tensor",
        "torch/nn/functional")


def _site(frame) -> str:
    return f"{frame.get('filename', '').split('site-packages/')[-1]}:{frame.get('line')} {frame.get('name')}"


def where(frames) -> str:
    """The first two framework frames of an allocation's stack, or its first python frame."""
    ours = [_site(f) for f in frames or [] if any(k in f.get("filename", "") for k in OURS)][:2]
    if ours:
        return " <- ".join(ours)
    py = [_site(f) for f in frames or [] if f.get("filename", "").endswith(".py")]
    return py[0] if py else "(no python frame)"


def peak_report(snap: dict, top: int = 14) -> dict:
    live_end = sum(b["size"] for seg in snap["segments"] for b in seg["blocks"]
                   if b["state"] == "active_allocated")
    traces = snap["device_traces"]
    trace = max(traces, key=len) if traces else []
    # totals[i]: bytes allocated before event i (walking back from the end state)
    totals = [0] * (len(trace) + 1)
    totals[-1] = total = live_end
    for i in range(len(trace) - 1, -1, -1):
        e = trace[i]
        if e["action"] == "alloc":
            total -= e["size"]
        elif e["action"] == "free_completed":
            total += e["size"]
        totals[i] = total
    at = max(range(len(totals)), key=totals.__getitem__)
    alive = {}
    for e in trace[:at]:
        if e["action"] == "alloc":
            alive[e["addr"]] = e
        elif e["action"] == "free_completed":
            alive.pop(e["addr"], None)
    groups, counts = collections.Counter(), collections.Counter()
    for e in alive.values():
        groups[where(e.get("frames"))] += e["size"]
        counts[where(e.get("frames"))] += 1
    last = trace[at - 1] if at > 0 else None
    return {
        "events": len(trace), "end_gib": live_end / GiB, "peak_gib": totals[at] / GiB, "at": at,
        "older_gib": (totals[at] - sum(groups.values())) / GiB,
        "reached_by": None if last is None else (last["action"], last["size"] / 2**20, where(last.get("frames"))),
        "groups": [(s / GiB, counts[k], k) for k, s in groups.most_common(top)],
    }


def print_report(path: str, r: dict) -> None:
    print(f"\n### {path}")
    print(f"trace events {r['events']}; allocated at the end {r['end_gib']:.2f} GiB; peak {r['peak_gib']:.2f} GiB "
          f"after event {r['at']}; allocated before the trace window: {r['older_gib']:.2f} GiB")
    if r["reached_by"]:
        action, mib, site = r["reached_by"]
        print(f"event reaching the peak: {action} {mib:.1f} MiB at {site}")
    print("live at the peak, by first framework frame:")
    for gib, n, site in r["groups"]:
        print(f"  {gib:7.2f} GiB  {n:5d} blocks  {site}")


def main(paths) -> int:
    for p in paths:
        with open(p, "rb") as f:
            print_report(p, peak_report(pickle.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
