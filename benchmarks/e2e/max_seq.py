"""The end-to-end benchmark's max-seq mode (benchmarks.e2e.bench --max-seq): one GPU, seq_len
doubling from --seq-start until the first failure (OOM or other), baseline vs fused."""

from __future__ import annotations

import shlex
import time

from benchmarks.bench_common import cell
from benchmarks.e2e.runs import RunResult, emit, header, run_job


def run_max_seq(opts):
    seqs = []
    s = opts.seq_start
    while s <= opts.seq_max:
        seqs.append(s)
        s *= 2
    if opts.seqs:
        seqs = [int(x) for x in opts.seqs.split(",") if x.strip()]
    lb = opts.max_seq_local_batch
    rows = []
    t_start = time.time()
    for mode in ("baseline", "fused"):
        longest, first_fail = None, None
        per = []
        for seq in seqs:
            if opts.budget and time.time() - t_start > opts.budget:
                print(f"[e2e] max-seq {mode} seq {seq}: skipped, --budget {opts.budget}s spent", flush=True)
                first_fail = (seq, RunResult("maxseq", mode, [], "", status="skipped (budget)"))
                break
            a = ["--training.steps", str(opts.max_seq_steps), "--metrics.log_freq", "1",
                 "--debug.seed", str(opts.seed), "--training.seq_len", str(seq)]
            if lb:
                a += ["--training.local_batch_size", str(lb)]
            a += shlex.split(opts.extra)
            if mode == "fused":
                a += shlex.split(opts.fused_flag)
            r = run_job(f"maxseq{seq}", mode, 1, a, opts, opts.max_seq_steps)
            per.append((seq, r))
            if r.ok:
                longest = seq
            else:
                first_fail = (seq, r)
                break
        rows.append((mode, longest, first_fail, per))
    lines = ["| mode | longest seq_len that trained | first failure | max_reserved GiB at longest | median tps at longest | runs |",
             "|---|---|---|---|---|---|"]
    for mode, longest, ff, per in rows:
        at = next((r for s, r in per if s == longest), None)
        runs = ", ".join(f"{s}:{r.status}" for s, r in per)
        lines.append(f"| {mode} | {longest or 'none'} | {f'{ff[0]} ({ff[1].status})' if ff else 'none of those tried'} "
                     f"| {cell(at.max_mem, '.2f') if at else ''} | {cell(at.median_tps, ',.0f') if at else ''} | {runs} |")
    tried = f"seq_lens {opts.seqs}" if opts.seqs else f"seq_len doubling {opts.seq_start}..{opts.seq_max}"
    notes = [f"- one GPU, {opts.max_seq_steps} steps per try, local batch {lb or 'from config'}, {tried}, "
             f"stop at first failure; fused flag `{opts.fused_flag}`"]
    block = header("Max seq_len on one GPU: baseline vs fused CE", opts, notes) + "\n".join(lines)
    emit(block, opts)
    return 0
