#!/usr/bin/env python3
"""End-to-end parity and memory/throughput of the fused CE in torchtitan training jobs.

    python -m benchmarks.e2e.bench --cases fsdp2,tp2 [--steps 20] [--max-seq | --search ...]

Cases (the default, cases.py): for each named case it runs ``./run_train.sh`` twice (baseline,
then with --fused_ce.enable), same seed, saves each run's stdout+stderr to
<out>/<case>_<mode>.log, parses torchtitan's per-step metric lines (runs.py: the run machinery
every mode shares), and prints (and appends to benchmarks/log/results.md) a table:
loss at steps 1/10/20, the max relative loss difference fused vs baseline over all steps,
max_reserved GiB (max over the logged steps), median tps (excluding step 1), ratios.

Exit status: 0 all parity checks passed; 1 a parity check failed; 2 a run failed so a
parity check could not be made, or a check came out NOISE (and no parity check failed).
--noise-ref reruns each baseline: bf16 training is not bitwise reproducible here (on 2x H200,
same seed, the FSDP2 baseline ended step 10 at 7.79945, the FSDP2 reshard-always baseline -- the
same math -- at 7.79310, 8e-4 apart), so a 1e-3 tolerance over 10-20 steps is at the noise level; NOISE = above the tolerance but within
2x the baseline-vs-baseline difference.

--pairs N runs N baseline/fused pairs per case, alternating which mode goes first, and adds a
table of each pair's tps ratio (median and range): a host-bound layout (TP at small local batch)
drifts 20-30% between runs (RESULTS.md, 4 GPUs, commit 3a4e669), more than one pair can resolve.
Parity and memory come from the first pair.

Max-seq_len mode (--max-seq, max_seq.py): one GPU, seq_len doubling from --seq-start until the first
failure (OOM or other), baseline vs fused, --max-seq-steps steps each.

Search mode (--search, search.py): under a GPU memory cap, the fastest setting (compile x
activation checkpointing x local batch) of the baseline and of the fused head.
"""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks.bench_common import RESULTS_LOG, ROOT
from benchmarks.e2e import search
from benchmarks.e2e.cases import CASES, DEFAULT_CASES, NOISE_FACTOR, run_cases
from benchmarks.e2e.max_seq import run_max_seq
from benchmarks.e2e.runs import config_training


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES,
                   help=f"comma list of {', '.join(CASES)}; or custom name=NGPU:bf16|fp32:ARGS")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--deterministic", action="store_true", help="pass --debug.deterministic")
    p.add_argument("--config", default=os.path.join("train_configs", "llama3_1b.toml"))
    p.add_argument("--launcher", default="./run_train.sh")
    p.add_argument("--fused-flag", default="--fused_ce.enable")
    p.add_argument("--extra", default="", help="extra args for every run (one string)")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=None, help="override training.seq_len")
    p.add_argument("--local-batch", type=int, default=None, help="override training.local_batch_size")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--budget", type=float, default=0, help="skip remaining runs after this many s (0: no limit)")
    p.add_argument("--out", default=os.path.join("outputs", "e2e"))
    p.add_argument("--results", default=RESULTS_LOG, help="the results log to append to")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--no-dump-folders", dest="dump_folders", action="store_false",
                   help="do not pass --job.dump_folder <dump-root>/<case>_<mode> per run")
    p.add_argument("--dump-root", default=None, help="parent of the per-run dump folders (default --out)")
    p.add_argument("--noise-ref", action="store_true",
                   help="also rerun the baseline: reports run-to-run loss noise; a fused diff above the "
                        f"tolerance but <= {NOISE_FACTOR}x that noise is NOISE, not FAIL")
    p.add_argument("--pairs", type=int, default=1,
                   help="baseline/fused pairs per case, alternating which runs first; >1 adds a table of "
                        "per-pair tps ratios (parity and memory: the first pair)")
    p.add_argument("--seqs", default=None, help="max-seq: comma list of seq_lens to try instead of doubling")
    p.add_argument("--max-seq", action="store_true", help="one-GPU longest-seq_len search instead of the cases")
    p.add_argument("--seq-start", type=int, default=8192)
    p.add_argument("--seq-max", type=int, default=262144)
    p.add_argument("--max-seq-steps", type=int, default=5)
    p.add_argument("--max-seq-local-batch", type=int, default=1, help="0: the config's")
    search.add_arguments(p)
    opts = p.parse_args(argv)
    if opts.pairs < 1:
        p.error(f"--pairs must be >= 1, got {opts.pairs}")
    opts.out = os.path.abspath(opts.out)
    training = config_training(os.path.join(ROOT, opts.config))  # join keeps an absolute path
    opts.config_local_batch = int(training.get("local_batch_size", 2))
    opts.schedule_steps = int(training.get("steps", 0))
    if opts.max_seq:
        return run_max_seq(opts)
    if opts.search:
        return search.run_search(opts)
    return run_cases(opts)


if __name__ == "__main__":
    sys.exit(main())
