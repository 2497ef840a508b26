"""Smoke test of benchmarks/kernel/bench.py on CPU: --quick runs the whole pipeline
(random and LM-like inputs, fp64 reference, timing, accuracy, table; --sweep; --options) on tiny
shapes in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*extra, timeout=60):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel.bench", "--quick", "--device", "cpu", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.split("|")[1:-1]]


def _table(out: str) -> list[str]:
    lines = out.strip().splitlines()
    # the Markdown table is the last thing printed
    i = len(lines) - 1
    while i >= 0 and lines[i].startswith("|"):
        i -= 1
    return lines[i + 1 :]


KERNEL_HEADER = ["shape (N, D, V)", "impl", "ms", "TFLOP/s", "vs best anchor", "vs GEMM floor", "peak GiB",
                 "peak+grads GiB", "loss err random", "dh err random", "dW err random", "loss err lm",
                 "dh err lm", "dW err lm", "err / eager (max)", "first call s", "status"]


def test_quick_cpu_prints_table(tmp_path):
    res = tmp_path / "RESULTS.md"
    p = _run("--results", str(res), "--no-append")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = _table(p.stdout)
    assert table, p.stdout[-2000:]
    assert _cells(table[0]) == KERNEL_HEADER, table[0]
    assert re.fullmatch(r"\|(---\|)+", table[1]), table[1]
    body = table[2:]
    impls = [r.split("|")[2].strip() for r in body]
    for name in ("fused", "eager", "compile", "liger", "cce", "floor"):
        assert name in impls, (name, impls)
    rows = {}
    for r in body:
        cells = _cells(r)
        rows.setdefault(cells[1], []).append(cells)
    # eager runs on CPU: a time and small errors against the fp64 reference, on both input kinds
    for cells in rows["eager"]:
        assert float(cells[2]) > 0
        for err in cells[8:14]:
            assert float(err) < 2e-2, cells
        assert float(cells[14]) == 1.0  # eager against itself
    # CUDA-only anchors are reported as n/a, not crashes
    for name in ("liger", "cce"):
        for cells in rows[name]:
            assert cells[2].startswith("n/a"), cells
    # the fused op: either measured with small errors, or reported n/a when not importable
    for cells in rows["fused"]:
        if not cells[2].startswith("n/a"):
            assert cells[-1] == "ok", cells
            for err in cells[8:14]:
                assert float(err) < 2e-2, cells
            assert float(cells[14]) > 0
    # the floor row is the reference of the 'vs GEMM floor' column
    for cells in rows["floor"]:
        assert float(cells[5]) == 1.0
    # header of the appended block is printed too; nothing written with --no-append
    assert "- command: `benchmarks/kernel/bench.py --quick" in p.stdout
    assert "relative L2 vs the fp64 reference" in p.stdout
    # the measured softmax of each kind, per shape: LM-like inputs are peaked, random ones flat
    probs = re.findall(r"inputs at \((\d+), (\d+), (\d+)\): random mean target prob ([\d.]+), entropy [\d.]+ nats; "
                       r"lm mean target prob ([\d.]+), entropy ([\d.]+) nats", p.stdout)
    assert len(probs) == 2, p.stdout[-3000:]
    for *_, p_rand, p_lm, ent_lm in probs:
        assert float(p_rand) < 0.01 and float(p_lm) > 0.05 and 1.0 < float(ent_lm) < 5.0, probs
    assert not res.exists()


def test_quick_cpu_one_input_kind(tmp_path):
    p = _run("--inputs", "lm", "--impls", "eager", "--shapes", "64x16x100", "--no-append")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = _table(p.stdout)
    assert _cells(table[0])[8:12] == ["loss err lm", "dh err lm", "dW err lm", "err / eager (max)"], table[0]
    assert "times on lm inputs only" in p.stdout
    bad = _run("--inputs", "random,zipf", "--impls", "eager", "--shapes", "64x16x100", "--no-append")
    assert bad.returncode != 0 and "--inputs" in bad.stderr


def test_quick_cpu_appends(tmp_path):
    res = tmp_path / "RESULTS.md"
    p = _run("--results", str(res), "--impls", "eager,floor", "--shapes", "64x16x100")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = res.read_text()
    assert "## Kernel benchmark" in text and "- device: CPU" in text
    assert "| shape (N, D, V) | impl |" in text and "torch " in text
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    assert f"- commit: {commit.strip()}" in text  # every results block names its commit


SWEEP_HEADER = ["axis", "N", "D", "V", "fused ms", "compile ms", "fused/compile ms", "fused peak GiB",
                "compile peak GiB", "fused/compile peak", "plan chunks", "plan rows", "plan fp32 carry", "plan ms",
                "fused ms / plan", "plan workspace GiB", "fused peak / plan", "fused dh err", "eager dh err",
                "fused dW err", "eager dW err", "fused loss err", "eager loss err", "fused dh err lm",
                "eager dh err lm", "fused dW err lm", "eager dW err lm", "fused loss err lm",
                "eager loss err lm", "status"]


def test_quick_cpu_sweep_prints_ratio_table(tmp_path):
    p = _run("--sweep", "--results", str(tmp_path / "R.md"), "--no-append")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = _table(p.stdout)
    assert _cells(table[0]) == SWEEP_HEADER, table[0]
    body = [_cells(r) for r in table[2:]]
    assert [(r[0], r[1], r[2], r[3]) for r in body] == [
        ("N", "128", "64", "1000"), ("N", "256", "64", "1000"), ("N", "512", "64", "1000"),
        ("V", "256", "64", "500"), ("V", "256", "64", "2000"),
        ("D", "256", "32", "1000"), ("D", "256", "64", "1000"), ("short", "64", "64", "4000")]
    assert body[1][4:] == body[6][4:]  # one point on two axes is measured once
    for r in body:
        assert float(r[4]) > 0, r  # fused timed on CPU
        assert r[5].startswith("n/a"), r  # torch.compile is not run on CPU
        for err in r[17:29]:  # fused and eager against fp64, on random and LM-like inputs
            assert float(err) < 2e-2, r
        # the plan's prediction beside the measurement
        assert r[10].isdigit(), r
    assert re.search(r"- wall time of the sweep: \d+ s", p.stdout)
    assert "reps 3" in p.stdout


def test_sweep_shows_the_plan():
    """The plan columns come from fused_loss.plan.plan_chunks, called with the op's arguments:
    "mean" announces its upstream gradient (no fp32 dh), "sum" does not."""
    import types

    from benchmarks.kernel import sweep as kernel_sweep
    from benchmarks.kernel.common import Row

    from fused_loss.plan import ChunkPlan, plan_chunks

    for reduction, dh_fp32 in (("mean", False), ("sum", True)):
        args = types.SimpleNamespace(dtype="bfloat16", chunk_size=None, reduction=reduction,
                                     chunk_budget_mib=None)
        assert kernel_sweep.plan_prediction((16384, 4096, 128256), args) == plan_chunks(
            16384, 4096, 128256, 2, dh_fp32=dh_fp32)
    args = types.SimpleNamespace(dtype="bfloat16", chunk_size=None, reduction="mean",
                                 chunk_budget_mib=4096)  # the cap the op is given
    assert kernel_sweep.plan_prediction((16384, 4096, 128256), args) == plan_chunks(
        16384, 4096, 128256, 2, dh_fp32=False, chunk_budget_bytes=4 << 30) != plan_chunks(
        16384, 4096, 128256, 2, dh_fp32=False)
    args = types.SimpleNamespace(dtype="bfloat16", chunk_size=None, reduction="mean",
                                 chunk_budget_mib=None)
    plan = kernel_sweep.plan_prediction((8192, 2304, 256000), args)
    assert (plan.rows, plan.n_chunks, plan.carry_fp32) == (2048, 4, True)
    plan = ChunkPlan(rows=2048, n_chunks=4, carry_fp32=True, predicted_ms=40.0, workspace_bytes=3 << 29)
    shape = (8192, 4096, 128256)
    point = {"plan": plan, "eager_acc": (1e-6, 2e-3, 3e-3), "eager_status": "ok", "rows": {
        "fused": Row(shape, "fused", ms=42.0, peak_gib=1.5, loss_err=1e-6, dh_err=1e-3, dW_err=2e-3),
        "compile": Row(shape, "compile", ms=40.0, peak_gib=2.0)}}
    table = kernel_sweep.sweep_table([("N", shape, point)], ["fused", "compile"]).splitlines()
    assert _cells(table[0]) == SWEEP_HEADER
    assert _cells(table[2]) == ["N", "8192", "4096", "128256", "42.00", "40.00", "1.050", "1.50", "2.00", "0.75",
                                "4", "2048", "yes", "40.00", "1.05", "1.50", "1.00", "1.0e-03", "2.0e-03",
                                "2.0e-03", "3.0e-03", "1.0e-06", "1.0e-06", "", "", "", "", "", "", "ok"]


def test_quick_cpu_options_table(tmp_path):
    p = _run("--options", "--results", str(tmp_path / "R.md"), "--no-append")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = _table(p.stdout)
    assert _cells(table[0]) == ["option", "arguments", "ms", "vs all-off", "peak GiB", "peak - all-off GiB",
                                "first call s", "status"], table[0]
    body = [_cells(r) for r in table[2:]]
    assert [r[0] for r in body] == ["plain", "all-off", "bias", "class_weight", "shift", "token_stats",
                                    "logit_softcap", "label_smoothing", "z_loss", "lean", "all-off (again, last)"]
    for r in body:
        assert r[-1] == "ok" and float(r[2]) > 0, r
    assert body[1][3] == "1.000"  # the ratios are against the explicit all-off row
    assert "(256, 64, 1000)" in p.stdout  # --quick: a tiny shape


def test_quick_cpu_profile_table(tmp_path):
    p = _run("--profile", "--results", str(tmp_path / "R.md"), "--no-append")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = _table(p.stdout)
    assert _cells(table[0]) == ["point (N x D x V)", "impl", "kernels", "launches / step",
                                "ms / step", "share"], table[0]
    body = [_cells(r) for r in table[2:]]
    fused = [r for r in body if r[1] == "fused"]
    points = sorted({r[0] for r in fused})
    assert points == ["128x64x1000", "256x32x2000"], points  # --quick's shapes, each profiled
    for point in points:
        rows = [r for r in fused if r[0] == point]
        assert rows[0][2] == "step" and [r[2] for r in rows[-3:]] == [
            "idle (step - kernels)", "of which host lead (trace)",
            "of which gaps after the first GEMM (trace)"], rows
        assert "GEMM" in [r[2] for r in rows]  # the three GEMMs, classed as such
        step_ms = float(rows[0][4])
        assert step_ms > 0
        # the classes and the idle time add up to the step
        assert abs(sum(float(r[4]) for r in rows[1:-2]) - step_ms) < 1e-2 * step_ms + 2e-3, rows
        # the trace places the host path before the first GEMM inside the step; no device
        # gaps on the CPU
        assert 0 < float(rows[-2][4]) < step_ms and rows[-1][4] == "", rows
    compile_rows = [r for r in body if r[1] == "compile"]
    assert compile_rows and all(r[5].startswith("n/a") for r in compile_rows)


def test_benchmark_modules_write_no_globals():
    """Options travel as arguments: no mode sets a module global at run time."""
    for path in (ROOT / "benchmarks").rglob("*.py"):
        text = path.read_text()
        assert "globals()" not in text and "\nglobal " not in text and "    global " not in text, path.name


def test_soak_reads_the_one_run_and_judges_it(tmp_path):
    """soak.py reads the job's events through the shared reader (benchmarks/tb_events.py)."""
    import pytest
    from torch.utils.tensorboard import SummaryWriter

    from benchmarks.e2e import soak

    def write(folder, memory):
        w = SummaryWriter(str(folder))
        for step, m in enumerate(memory, 1):
            w.add_scalar("loss_metrics/global_avg_loss", 10.0 / step, step)
            w.add_scalar("memory/max_active(GiB)", m, step)
        w.close()

    write(tmp_path / "dump" / "tb" / "20261122-0230", [5.0] + [20.0] * 9 + [20.1])
    losses = [v for _, v in soak.read_scalars(tmp_path / "dump", "loss_metrics/global_avg_loss")]
    memory = [v for _, v in soak.read_scalars(tmp_path / "dump", soak.MAX_ACTIVE_TAG)]
    assert losses == pytest.approx([10.0 / s for s in range(1, 12)])
    assert soak.verdict(losses, memory, 0.01) == (True, 20.0, pytest.approx(0.005, rel=1e-4), True)
    assert soak.verdict(losses + [float("nan")], memory, 0.001)[::3] == (False, False)
    write(tmp_path / "dump" / "tb" / "20261122-0300", [1.0])  # a second run in the same dump
    with pytest.raises(SystemExit, match="holds 2 folders with event files"):
        soak.read_scalars(tmp_path / "dump", "loss_metrics/global_avg_loss")
