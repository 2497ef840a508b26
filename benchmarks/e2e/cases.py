"""The end-to-end benchmark's cases (benchmarks.e2e.bench, the default mode): each case run
baseline then fused, loss parity, the table; --noise-ref and --pairs."""

from __future__ import annotations

import os
import shlex
import statistics
import time

from benchmarks.bench_common import ROOT, cell, ratio
from benchmarks.e2e.runs import RunResult, common_args, emit, header, max_rel_diff, run_job

# name -> (ngpu, extra args, precision of the loss/logits: "bf16" or "fp32")
# {accum2_gbs}: the global batch of two gradient-accumulation steps (2 x local batch x data-parallel degree 2)
CASES = {
    "fsdp2": (2, ["--parallelism.data_parallel_shard_degree", "2"], "bf16"),
    "tp2": (2, ["--parallelism.data_parallel_shard_degree", "1", "--parallelism.tensor_parallel_degree", "2"], "fp32"),
    "cp2": (2, ["--parallelism.data_parallel_shard_degree", "1", "--parallelism.context_parallel_degree", "2"], "bf16"),
    "fsdp2_reshard_always": (
        2, ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.fsdp_reshard_after_forward", "always"], "bf16"),
    "fsdp2_accum2": (2, ["--parallelism.data_parallel_shard_degree", "2", "--training.global_batch_size", "{accum2_gbs}"], "bf16"),
    "fsdp2_compile": (
        2, ["--parallelism.data_parallel_shard_degree", "2", "--compile.enable", "--compile.components", "model,loss"], "bf16"),
    "single": (1, [], "bf16"),
    # 4 GPUs: two parallelisms combined. bf16 in all four: CP alone also turns FSDP on
    # (over the dp_shard x cp mesh), and FSDP casts the parameters.
    "fsdp2_tp2": (4, ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2"], "bf16"),
    "fsdp2_cp2": (4, ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.context_parallel_degree", "2"], "bf16"),
    "tp2_cp2": (
        4, ["--parallelism.data_parallel_shard_degree", "1", "--parallelism.tensor_parallel_degree", "2",
            "--parallelism.context_parallel_degree", "2"], "bf16"),
    "hsdp": (
        4, ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "2"], "bf16"),
}
DEFAULT_CASES = "fsdp2,tp2,cp2,fsdp2_reshard_always,fsdp2_accum2,fsdp2_compile"
MULTI4_CASES = "fsdp2_tp2,fsdp2_cp2,tp2_cp2,hsdp"  # gpu_run.sh multi4 (nvidia-h200-x4)
TOL = {"bf16": 1e-3, "fp32": 1e-4}


NOISE_FACTOR = 2.0


def parity(base: RunResult, fused: RunResult, precision: str, base2: RunResult | None = None):
    """PASS: max rel diff <= tol. With a second baseline run (base2, --noise-ref): a diff above tol
    but <= NOISE_FACTOR x the baseline-vs-baseline diff is reported as NOISE (not a failure)."""
    tol = TOL[precision]
    if not (base.ok and fused.ok):
        return "n/a", None, tol
    d, _ = max_rel_diff(fused, base)
    if d is None:
        return "n/a", None, tol
    if d <= tol:
        return "PASS", d, tol
    if base2 is not None and base2.ok:
        noise, _ = max_rel_diff(base2, base)
        if noise is not None and d <= NOISE_FACTOR * noise:
            return "NOISE", d, tol
    return "FAIL", d, tol


def make_table(pairs, steps_to_show=(1, 10, 20)):
    """pairs: list of (case, precision, base, fused[, base2]) RunResults; base2 = baseline rerun."""
    cols = ["case", "mode", "status"] + [f"loss@{s}" for s in steps_to_show] + [
        "max rel loss diff", "parity (tol)", "max_reserved GiB", "median tps", "mem fused/base", "tps fused/base"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    failures = []
    for case, precision, base, fused, *rest in pairs:
        base2 = rest[0] if rest else None
        verdict, d, tol = parity(base, fused, precision, base2)
        for r in (base, fused) + ((base2,) if base2 is not None else ()):
            is_f = r is fused
            row = [case if r is base else "", r.mode, r.status]
            row += [cell(r.loss_at(s), ".5f") for s in steps_to_show]
            if r is base2:
                nd = max_rel_diff(base2, base)[0] if (base.ok and base2.ok) else None
                row += [cell(nd, ".2e"), "run-to-run noise (baseline rerun)"]
            else:
                row += [cell(d, ".2e") if is_f else "", f"{verdict} ({tol:.0e}, {precision})" if is_f else ""]
            row += [cell(r.max_mem, ".2f"), cell(r.median_tps, ",.0f")]
            row += [cell(ratio(fused.max_mem, base.max_mem), ".3f") if is_f else "",
                    cell(ratio(fused.median_tps, base.median_tps), ".3f") if is_f else ""]
            lines.append("| " + " | ".join(row) + " |")
        if verdict != "PASS":
            failures.append((case, verdict, base, fused))
        elif base2 is not None and not base2.ok:
            failures.append((case, "n/a", base2, fused))
    return "\n".join(lines), failures


def failure_details(failures) -> str:
    out = []
    for case, verdict, base, fused in failures:
        for r in (base, fused):
            if r.ok:
                continue
            out.append(f"{case}/{r.mode}: {r.status} (log {os.path.relpath(r.log_path, ROOT)})")
            out += [f"    {l[:220]}" for l in r.tail[-10:]]
        if verdict in ("FAIL", "NOISE"):
            common = sorted(set(base.steps) & set(fused.steps))
            diffs = [f"{s}:{base.steps[s].loss:.5f}/{fused.steps[s].loss:.5f}" for s in common]
            out.append(f"{case}: loss base/fused per step: " + " ".join(diffs))
    return "\n".join(out)


def resolve_case(name, opts):
    if "=" in name:  # custom: name=NGPU:precision:args...
        nm, spec = name.split("=", 1)
        ngpu, prec, rest = spec.split(":", 2)
        return nm, int(ngpu), shlex.split(rest), prec
    if name not in CASES:
        raise SystemExit(f"unknown case {name!r}; known: {', '.join(CASES)} (or name=NGPU:bf16|fp32:ARGS)")
    ngpu, a, prec = CASES[name]
    lb = opts.local_batch or opts.config_local_batch
    dp = 2
    a = [x.replace("{accum2_gbs}", str(2 * lb * dp)) for x in a]
    return name, ngpu, a, prec


def run_order(n_pairs: int, noise_ref: bool):
    """(mode, pair index) in the order the runs are made. Pair 0 is baseline, fused[, baseline2];
    odd pairs run fused first, so a drift over the call falls on both modes alike."""
    order = [("baseline", 0), ("fused", 0)] + ([("baseline2", 0)] if noise_ref else [])
    for i in range(1, n_pairs):
        pair = [("baseline", i), ("fused", i)]
        order += pair[::-1] if i % 2 else pair
    return order


def pairs_table(tps_pairs) -> str:
    """Per-pair median tps of both modes and their ratio, then the median and range of the ratios."""
    lines = ["| case | pair | first | baseline tps | fused tps | tps fused/base |", "|---|---|---|---|---|---|"]
    for case, runs in tps_pairs:
        ratios = []
        for i, base, fused in runs:
            r = ratio(fused.median_tps, base.median_tps) if (base.ok and fused.ok) else None
            if r is not None:
                ratios.append(r)
            lines.append(f"| {case if i == 0 else ''} | {i} | {'fused' if i % 2 else 'baseline'} "
                         f"| {cell(base.median_tps, ',.0f')} | {cell(fused.median_tps, ',.0f')} | {cell(r, '.3f')} |")
        if ratios:
            lines.append(f"| | median of {len(ratios)} | | | | {statistics.median(ratios):.3f} "
                         f"({min(ratios):.3f}-{max(ratios):.3f}) |")
    return "\n".join(lines)


def run_cases(opts):
    names = [c.strip() for c in opts.cases.split(",") if c.strip()]
    pairs = []
    t_start = time.time()
    tps_pairs = []  # (case, [(pair index, baseline RunResult, fused RunResult)]) with --pairs > 1
    for name in names:
        nm, ngpu, case_args, prec = resolve_case(name, opts)
        results = {}
        for mode, pair in run_order(opts.pairs, opts.noise_ref):
            a = case_args + common_args(opts, opts.steps)
            if mode == "fused":
                a += shlex.split(opts.fused_flag)
            if opts.budget and time.time() - t_start > opts.budget:
                r = RunResult(nm, mode, [opts.launcher] + a, "", status="skipped (budget)")
                print(f"[e2e] {nm}/{mode}: skipped, --budget {opts.budget}s spent", flush=True)
            else:
                r = run_job(nm, mode, ngpu, a, opts, opts.steps, log_name=f"{nm}_{mode}_p{pair}" if pair else None)
            results[mode, pair] = r
        pairs.append((nm, prec, results["baseline", 0], results["fused", 0])
                     + ((results["baseline2", 0],) if opts.noise_ref else ()))
        if opts.pairs > 1:
            tps_pairs.append((nm, [(i, results["baseline", i], results["fused", i]) for i in range(opts.pairs)]))
    steps_to_show = tuple(s for s in (1, 10, 20) if s <= opts.steps) or (1,)
    if opts.steps not in steps_to_show:
        steps_to_show = steps_to_show + (opts.steps,)
    table, failures = make_table(pairs, steps_to_show)
    notes = [
        f"- steps {opts.steps}, seed {opts.seed}, deterministic {opts.deterministic}, noise-ref {opts.noise_ref}, "
        f"pairs {opts.pairs}; "
        f"fused flag `{opts.fused_flag}`; "
        f"extra `{opts.extra}`",
        "- max_reserved GiB: max over steps of torchtitan's per-step max_reserved; tps: median per-GPU tps "
        "excluding step 1; parity: max over steps of |loss_fused - loss_base| / |loss_base| "
        "(tolerance 1e-3 bf16, 1e-4 fp32; NOISE: above it but <= 2x the baseline-rerun diff)",
    ]
    block = header("End-to-end: torchtitan baseline vs fused CE", opts, notes)
    if tps_pairs:
        block += pairs_table(tps_pairs) + "\n\n"
    det = failure_details(failures)
    if det:
        block += "Failures / runs that did not finish (last log lines):\n```\n" + det + "\n```\n\n"
    block += table  # the table last
    emit(block, opts)
    if any(v == "FAIL" for _, v, _, _ in failures):
        return 1
    if failures:
        return 2
    return 0
