"""e2e.py --search: what the freed memory buys. Under a GPU memory cap, the fastest
setting of the baseline and of the fused head.

    python3 -m benchmarks.e2e.bench --search --caps 80,40 --steps 15 [--config train_configs/llama3_1b.toml]

For each cap (smallest first), and for each mode (baseline, then fused), every setting of
torch.compile (off, on) x activation checkpointing (none, selective, full) x local batch
(1, 2, 4, ...) is trained for --steps steps on --search-ngpu GPUs, except where the answer is
already known:
  - within one (compile, AC) pair the batches go up until the first run that fails (out of
    memory): a larger batch at the same AC needs more memory, so it is not tried;
  - a heavier AC is tried only at batches larger than the largest that fit at a lighter AC (same
    compile): at the same batch it does the same work plus recomputation, so it is not faster;
  - a run that fit under a smaller cap without ever reaching it (no allocator retries: torchtitan
    warns of any) is the same run under a larger cap, so it is reused there, not repeated.
The cap is a real limit: every run starts through benchmarks/e2e/memory_cap.py (run_train.sh's
TRAIN_FILE), which calls torch.cuda.set_per_process_memory_fraction before the trainer allocates
anything.

Printed (and appended to the results log): every run, then last the best setting per cap and
mode (highest median tps, step 1 excluded): the setting, tps, max_reserved, MFU, tps against the
baseline's best at that cap, and for the fused best its loss parity against the baseline at the
same setting, or that the baseline did not fit there. Exit 0 when every mode found a setting at
every cap, else 2.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from dataclasses import dataclass

from benchmarks.bench_common import cell, md_table, ratio
from benchmarks.e2e.runs import RunResult, common_args, emit, header, max_rel_diff, run_job

AC_MODES = ("none", "selective", "full")
MODES = ("baseline", "fused")


@dataclass(frozen=True)
class Setting:
    compile: bool
    ac: str
    local_batch: int

    def args(self) -> list[str]:
        a = ["--activation_checkpoint.mode", self.ac, "--training.local_batch_size", str(self.local_batch)]
        return a + (["--compile.enable", "--compile.components", "model,loss"] if self.compile else [])

    @property
    def tag(self) -> str:
        return f"{'compile' if self.compile else 'eager'}_ac-{self.ac}_lb{self.local_batch}"

    def __str__(self) -> str:
        return f"{'compile' if self.compile else 'eager'}, AC {self.ac}, local batch {self.local_batch}"


def add_arguments(p) -> None:
    g = p.add_argument_group("search mode")
    g.add_argument("--search", action="store_true", help="fastest setting under each memory cap, baseline vs fused")
    g.add_argument("--caps", default="80,40", help="GPU memory caps in GiB, comma list")
    g.add_argument("--search-ngpu", type=int, default=1, help="GPUs per run")
    g.add_argument("--search-compile", default="off,on", help="torch.compile settings to try: off,on")
    g.add_argument("--search-ac", default=",".join(AC_MODES), help="activation checkpointing modes to try")
    g.add_argument("--search-batches", default="1,2,4,8,16,32,64", help="local batch sizes, ascending")


def _parse(opts):
    caps = sorted(float(c) for c in opts.caps.split(",") if c.strip())
    compiles = [{"off": False, "on": True}[c.strip()] for c in opts.search_compile.split(",") if c.strip()]
    acs = [a.strip() for a in opts.search_ac.split(",") if a.strip()]
    unknown = [a for a in acs if a not in AC_MODES]
    if unknown:
        raise SystemExit(f"--search-ac: unknown mode(s) {unknown}; known: {', '.join(AC_MODES)}")
    acs.sort(key=AC_MODES.index)  # lightest first: the pruning of heavier ones builds on it
    batches = sorted(int(b) for b in opts.search_batches.split(",") if b.strip())
    if opts.local_batch:
        raise SystemExit("--search sets the local batch itself; leave out --local-batch")
    return caps, compiles, acs, batches


def search_mode(mode: str, cap: float, opts, compiles, acs, batches, deadline, fitted: dict,
                longest: list) -> list[tuple[Setting, RunResult]]:
    """Every run of one mode at one cap, in the order made (see the module docstring for what is
    not run). fitted: setting -> this mode's run under a smaller cap that never reached that cap;
    it is reused here (marked with extra["same_run_as_cap"]), and this cap's such runs are added.
    longest: [seconds of the longest run so far]; a run is skipped when it would end past the
    deadline (so the tables are printed within the budget)."""
    runs = []
    for compile_on in compiles:
        lighter_fit = 0  # the largest batch that fit at a lighter AC, with this compile setting
        for ac in acs:
            largest = lighter_fit
            for lb in (b for b in batches if b > lighter_fit):
                setting = Setting(compile_on, ac, lb)
                if setting in fitted:
                    small_cap, r = fitted[setting]
                    r = dataclasses.replace(r, extra={**r.extra, "same_run_as_cap": small_cap})
                elif time.time() + longest[0] > deadline:  # it would not end in time
                    r = RunResult(f"cap{cap:g}", mode, [opts.launcher], "", status="skipped (budget)")
                else:
                    a = common_args(opts, opts.steps) + setting.args()
                    if mode == "fused":
                        a += shlex.split(opts.fused_flag)
                    r = run_job(f"cap{cap:g}_{setting.tag}", mode, opts.search_ngpu, a, opts, opts.steps,
                                env_extra={"TRAIN_FILE": "benchmarks.e2e.memory_cap", "MEMORY_CAP_GIB": f"{cap:g}"})
                    longest[0] = max(longest[0], r.seconds)
                    if r.ok and r.extra.get("alloc_retries") == 0:
                        fitted[setting] = (cap, r)
                runs.append((setting, r))
                if not r.ok:
                    break
                largest = lb
            lighter_fit = largest
    return runs


def _run_cell(r) -> str:
    small_cap = r.extra.get("same_run_as_cap")
    if small_cap is not None:
        return f"cap {small_cap:g}'s (never reached it)"
    return "here" if r.status != "skipped (budget)" else "-"


def best(runs):
    ok = [(s, r) for s, r in runs if r.ok and r.median_tps is not None]
    return max(ok, key=lambda sr: sr[1].median_tps) if ok else (None, None)


def runs_table(results) -> str:
    rows = [(cap, mode, s, r) for (cap, mode), runs in results.items() for s, r in runs]
    return md_table(rows, [
        ("cap GiB", lambda x: f"{x[0]:g}"),
        ("mode", lambda x: x[1]),
        ("compile", lambda x: "on" if x[2].compile else "off"),
        ("AC", lambda x: x[2].ac),
        ("local batch", lambda x: str(x[2].local_batch)),
        ("status", lambda x: x[3].status),
        ("run", lambda x: _run_cell(x[3])),
        ("allocator retries", lambda x: cell(x[3].extra.get("alloc_retries"), ".0f")),
        ("tps", lambda x: cell(x[3].median_tps, ",.0f")),
        ("max_reserved GiB", lambda x: cell(x[3].max_mem, ".2f")),
        ("MFU %", lambda x: cell(x[3].median_mfu, ".2f")),
    ])


def _parity_with_baseline(setting, fused_run, baseline_runs) -> str:
    """The largest relative loss difference to the baseline at the same setting, or why there is none."""
    base = next((r for s, r in baseline_runs if s == setting), None)
    if base is None:  # its (compile, AC) pair stopped at a smaller batch
        base_setting, base = next(((s, r) for s, r in baseline_runs if not r.ok and (s.compile, s.ac) == (
            setting.compile, setting.ac)), (None, None))
        return f"baseline: {base.status} already at local batch {base_setting.local_batch}" if base else "n/a"
    if not base.ok:
        return f"baseline: {base.status} at this setting"
    return cell(max_rel_diff(fused_run, base)[0], ".2e")


def best_table(results, caps) -> str:
    rows = []
    for cap in caps:
        base_setting, base_run = best(results[cap, "baseline"])
        for mode in MODES:
            s, r = best(results[cap, mode])
            parity = ""
            if mode == "fused" and r is not None:
                parity = _parity_with_baseline(s, r, results[cap, "baseline"])
            rows.append((cap, mode, s, r, ratio(r.median_tps, base_run.median_tps) if r and base_run else None, parity))
    return md_table(rows, [
        ("cap GiB", lambda x: f"{x[0]:g}"),
        ("mode", lambda x: x[1]),
        ("best setting", lambda x: str(x[2]) if x[2] else "none fits"),
        ("tps", lambda x: cell(x[3].median_tps if x[3] else None, ",.0f")),
        ("max_reserved GiB", lambda x: cell(x[3].max_mem if x[3] else None, ".2f")),
        ("MFU %", lambda x: cell(x[3].median_mfu if x[3] else None, ".2f")),
        ("tps vs baseline's best", lambda x: cell(x[4], ".3f")),
        ("max rel loss diff vs baseline, same setting", lambda x: x[5]),
    ])


def run_search(opts) -> int:
    caps, compiles, acs, batches = _parse(opts)
    deadline = time.time() + opts.budget if opts.budget else float("inf")
    results = {}
    fitted = {mode: {} for mode in MODES}
    longest = [0.0]
    for cap in caps:
        for mode in MODES:
            results[cap, mode] = search_mode(mode, cap, opts, compiles, acs, batches, deadline, fitted[mode],
                                               longest)
    notes = [
        f"- caps {opts.caps} GiB (torch.cuda.set_per_process_memory_fraction, benchmarks/e2e/memory_cap.py); "
        f"{opts.search_ngpu} GPU(s) per run; {opts.steps} steps, seed {opts.seed}; compile {opts.search_compile}; "
        f"AC {opts.search_ac}; local batches {opts.search_batches}, each (compile, AC) up to its first failure, "
        f"a heavier AC only above the largest batch a lighter one fit; a run that never reached a smaller cap "
        f"reused at a larger one; "
        f"fused flag `{opts.fused_flag}`; extra `{opts.extra}`",
        "- tps, MFU: medians per GPU without step 1; max_reserved: max over steps; best: highest tps",
    ]
    block = (header("Fastest setting under a memory cap: baseline vs fused CE", opts, notes)
             + "All runs:\n\n" + runs_table(results) + "\n\nBest per cap and mode:\n\n" + best_table(results, caps))
    emit(block, opts)
    return 0 if all(best(runs)[1] is not None for runs in results.values()) else 2
