"""Smoke test of benchmarks/bench_kernel.py on CPU: --quick runs the whole pipeline
(inputs, fp32 reference, timing, accuracy, table) on tiny shapes in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_kernel.py"


def _run(*extra, timeout=60):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def _table(out: str) -> list[str]:
    lines = out.strip().splitlines()
    # the Markdown table is the last thing printed
    i = len(lines) - 1
    while i >= 0 and lines[i].startswith("|"):
        i -= 1
    return lines[i + 1 :]


def test_quick_cpu_prints_table(tmp_path):
    res = tmp_path / "RESULTS.md"
    p = _run("--results", str(res), "--no-append")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = _table(p.stdout)
    assert table, p.stdout[-2000:]
    assert table[0].startswith("| shape (N, D, V) | impl | ms |"), table[0]
    assert re.fullmatch(r"\|(---\|)+", table[1]), table[1]
    body = table[2:]
    impls = [r.split("|")[2].strip() for r in body]
    for name in ("fused", "eager", "compile", "liger", "cce", "floor"):
        assert name in impls, (name, impls)
    rows = {}
    for r in body:
        cells = [c.strip() for c in r.split("|")[1:-1]]
        rows.setdefault(cells[1], []).append(cells)
    # eager runs on CPU: a time and small errors against the fp32 reference
    for cells in rows["eager"]:
        assert float(cells[2]) > 0
        for err in cells[8:11]:
            assert float(err) < 2e-2, cells
    # CUDA-only anchors are reported as n/a, not crashes
    for name in ("liger", "cce"):
        for cells in rows[name]:
            assert cells[2].startswith("n/a"), cells
    # the fused op: either measured with small errors, or reported n/a when not importable
    for cells in rows["fused"]:
        if not cells[2].startswith("n/a"):
            assert cells[-1] == "ok", cells
            for err in cells[8:11]:
                assert float(err) < 2e-2, cells
    # the floor row is the reference of the 'vs GEMM floor' column
    for cells in rows["floor"]:
        assert float(cells[5]) == 1.0
    # header of the appended block is printed too; nothing written with --no-append
    assert "- command: `benchmarks/bench_kernel.py --quick" in p.stdout
    assert not res.exists()


def test_quick_cpu_appends(tmp_path):
    res = tmp_path / "RESULTS.md"
    p = _run("--results", str(res), "--impls", "eager,floor", "--shapes", "64x16x100")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = res.read_text()
    assert "## Kernel benchmark" in text and "- device: CPU" in text
    assert "| shape (N, D, V) | impl |" in text and "torch " in text
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    assert f"- commit: {commit.strip()}" in text  # every results block names its commit


def test_quick_cpu_sweep_prints_growth_table(tmp_path):
    p = _run("--sweep", "--sweep-impls", "eager", "--results", str(tmp_path / "R.md"), "--no-append")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = _table(p.stdout)
    assert table[0].startswith("| axis | N | D | V | impl | ms | TFLOP/s | time x (vs first) |"), table
    body = [[c.strip() for c in r.split("|")[1:-1]] for r in table[2:]]
    assert [(r[0], r[1], r[3]) for r in body] == [
        ("N", "128", "1000"), ("N", "256", "1000"), ("N", "512", "1000"),
        ("V", "256", "500"), ("V", "256", "2000")]
    assert all(len(r) == 13 and r[-1] == "ok" for r in body), body
    assert body[0][7] == "1.00" and body[3][7] == "1.00"  # growth is against each axis's first point
    assert [r[8] for r in body] == ["1.00", "2.00", "4.00", "1.00", "4.00"]  # FLOP ratios


def test_benchmark_modules_write_no_globals():
    """Options travel as arguments (issue 15): no mode sets a module global at run time."""
    for path in (ROOT / "benchmarks").glob("*.py"):
        text = path.read_text()
        assert "globals()" not in text and "\nglobal " not in text and "    global " not in text, path.name


def test_soak_reads_the_one_run_and_judges_it(tmp_path):
    """soak.py reads the job's events through the shared reader (benchmarks/tb_events.py)."""
    import pytest
    from torch.utils.tensorboard import SummaryWriter

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import soak

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
