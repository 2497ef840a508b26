"""Tests for benchmarks/compare_runs.py (CPU, fast).

The tests write synthetic TensorBoard runs with torchtitan's tag names, run
``python benchmarks/compare_runs.py`` as a subprocess, and check the PNG and every number in
the Markdown table against values computed from the written events.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

from benchmarks import compare_runs
from benchmarks.compare_runs import fmt  # the formatting the table promises

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = [1, 10, 20, 30, 40, 50, 60, 70, 80]  # log_freq=10, as torchtitan logs


def f32(x: float) -> float:
    """TensorBoard stores scalars as float32; expected values must be computed from what was stored."""
    return float(np.float32(x))


def write_run(folder: Path, series: dict[str, list[float]], steps=STEPS) -> dict[str, list[float]]:
    """Write scalars like torchtitan's TensorBoardLogger. Returns the stored (float32) values."""
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(folder), max_queue=1000)
    for i, step in enumerate(steps):
        for tag, vals in series.items():
            writer.add_scalar(tag, vals[i], step)
    writer.close()
    return {tag: [f32(v) for v in vals] for tag, vals in series.items()}


def gpu_series(mem_base: float, loss0: float, tps_base: float, lse0: float) -> dict[str, list[float]]:
    n = len(STEPS)
    reserved = [mem_base * (0.5 if i == 0 else 1.0) + 0.013 * i + (0.7 if i == 3 else 0.0) for i in range(n)]
    return {
        "loss_metrics/global_avg_loss": [loss0 * math.exp(-0.11 * i) + 0.0123 for i in range(n)],
        "loss_metrics/global_max_loss": [loss0 * 1.2 * math.exp(-0.1 * i) for i in range(n)],
        "grad_norm": [1.0 / (i + 1) for i in range(n)],
        "throughput(tps)": [tps_base * (0.2 if i == 0 else 1.0 + 0.01 * ((i * 7) % 5)) for i in range(n)],
        "tflops": [1.5] * n,
        "mfu(%)": [12.3] * n,
        "memory/max_active(GiB)": [0.8 * v for v in reserved],
        "memory/max_active(%)": [10.0] * n,
        "memory/max_reserved(GiB)": reserved,
        "memory/max_reserved(%)": [12.0] * n,
        "memory/num_alloc_retries": [0.0] * n,
        "memory/num_ooms": [0.0] * n,
        "fused_ce/lse_mean": [lse0 + 0.05 * i for i in range(n)],
        "fused_ce/z_loss": [1e-4 * (lse0 + 0.05 * i) ** 2 for i in range(n)],
        "lr": [3e-4] * n,
    }


def run_report(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["MPLBACKEND"] = "Agg"
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.compare_runs", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def report_inproc(capsys):
    """Like run_report, but calls compare_runs.main in this process (fast). The CLI path has its own tests."""

    def run(*args: str) -> _Result:
        capsys.readouterr()
        rc = compare_runs.main(list(args))
        cap = capsys.readouterr()
        return _Result(rc, cap.out, cap.err)

    return run


def parse_table(md: str, first_header: str = "run") -> tuple[list[str], list[list[str]]]:
    """The first Markdown table whose header starts with ``| {first_header} |``."""
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip().strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return header, rows


def check_cell(cell: str, expected: float | None, what: str) -> None:
    if expected is None:
        assert cell == "n/a", f"{what}: expected n/a, got {cell!r}"
        return
    assert cell == fmt(expected), f"{what}: table has {cell!r}, events give {expected!r} -> {fmt(expected)!r}"
    # Independent of fmt: the printed number is the event value to 4 significant digits.
    assert math.isclose(float(cell), expected, rel_tol=1e-3, abs_tol=1e-12), (what, cell, expected)


def expected_stats(v: dict[str, list[float]], mem_tag: str) -> dict[str, float]:
    mem = v[mem_tag]
    n = len(mem)
    return {
        "peak": max(mem),
        "steady": statistics.median(mem[n // 2 :]),  # last half: ceil(n/2) points
        "loss": v["loss_metrics/global_avg_loss"][-1],
        "tps": statistics.median(v["throughput(tps)"]),
    }


def report_table(report_inproc, out: Path, *runs: Path) -> tuple[str, dict[str, int], list[list[str]]]:
    """Run the report on `runs` into `out`; its Markdown, column index by header, and rows."""
    res = report_inproc(*map(str, runs), "--out", str(out))
    assert res.returncode == 0, res.stderr
    md = (out / "report.md").read_text()
    header, rows = parse_table(md)
    return md, {h: i for i, h in enumerate(header)}, rows


@pytest.fixture
def two_runs(tmp_path):
    # Run A: the way torchtitan lays it out, {dump_folder}/tb/{YYYYmmdd-HHMM}/events...;
    # the report is given the dump folder.
    a_dir = tmp_path / "run_a"
    va = write_run(a_dir / "tb" / "20261122-0230", gpu_series(10.0, 8.0, 40000.0, 11.0))
    # Run B: the event folder itself.
    b_dir = tmp_path / "run_b" / "tb" / "20261122-0245"
    vb = write_run(b_dir, gpu_series(6.5, 8.1, 52000.0, 10.5))
    return a_dir, b_dir, va, vb


def test_report_numbers_and_png(two_runs, tmp_path):
    a_dir, b_dir, va, vb = two_runs
    out = tmp_path / "report"
    res = run_report(str(a_dir), str(b_dir), "--out", str(out), "--labels", "baseline,fused")
    assert res.returncode == 0, res.stderr

    png = out / "report.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image as mpimg

    img = mpimg.imread(str(png))
    assert img.ndim == 3 and img.shape[2] in (3, 4) and img.shape[0] > 100 and img.shape[1] > 300
    assert img.shape[1] > img.shape[0]  # panels side by side

    md = (out / "report.md").read_text()
    header, rows = parse_table(md)
    assert header == [
        "run", "memory tag", "peak memory", "peak memory ratio", "steady memory",
        "steady memory ratio", "final loss", "final loss ratio", "median tps",
        "median tps ratio", "last step",
    ]
    assert [r[0] for r in rows] == ["baseline", "fused"]
    col = {h: i for i, h in enumerate(header)}

    mem_tag = "memory/max_reserved(GiB)"  # preferred over max_active when both runs have it
    ea, eb = expected_stats(va, mem_tag), expected_stats(vb, mem_tag)
    for row, e in ((rows[0], ea), (rows[1], eb)):
        assert row[col["memory tag"]] == f"`{mem_tag}`"
        check_cell(row[col["peak memory"]], e["peak"], "peak memory")
        check_cell(row[col["steady memory"]], e["steady"], "steady memory")
        check_cell(row[col["final loss"]], e["loss"], "final loss")
        check_cell(row[col["median tps"]], e["tps"], "median tps")
        check_cell(row[col["peak memory ratio"]], e["peak"] / ea["peak"], "peak ratio")
        check_cell(row[col["steady memory ratio"]], e["steady"] / ea["steady"], "steady ratio")
        check_cell(row[col["final loss ratio"]], e["loss"] / ea["loss"], "loss ratio")
        check_cell(row[col["median tps ratio"]], e["tps"] / ea["tps"], "tps ratio")
        assert row[col["last step"]] == str(STEPS[-1])
    assert rows[0][col["peak memory ratio"]] == "1"

    # The fused-CE section comes from the fused_ce/* tags.
    fh, frows = parse_table(md.split("## Fused cross-entropy", 1)[1])
    for row, v in ((frows[0], va), (frows[1], vb)):
        check_cell(row[1], v["fused_ce/lse_mean"][-1], "final lse_mean")
        check_cell(row[2], max(v["fused_ce/lse_mean"]), "max lse_mean")
        check_cell(row[3], v["fused_ce/z_loss"][-1], "final z_loss")

    # The JSON holds the same numbers at full precision.
    import json

    summary = json.loads((out / "report.json").read_text())
    assert summary["runs"][1]["peak_memory"] == eb["peak"]
    assert summary["runs"][1]["median_tps"] == eb["tps"]
    assert summary["runs"][0]["folder"].endswith(os.path.join("tb", "20261122-0230"))


def test_default_labels_and_three_runs(two_runs, tmp_path, report_inproc):
    a_dir, b_dir, va, vb = two_runs
    c_dir = tmp_path / "run_c"
    write_run(c_dir, gpu_series(12.0, 7.9, 30000.0, 11.5))
    out = tmp_path / "r3"
    res = report_inproc(str(a_dir), str(b_dir), str(c_dir), "--out", str(out))
    assert res.returncode == 0, res.stderr
    _, rows = parse_table((out / "report.md").read_text())
    assert [r[0] for r in rows] == ["run_a", "20261122-0245", "run_c"]


def test_cpu_memory_tags(tmp_path, report_inproc):
    """CPU runs: the device tags hold torchtitan's -1-byte sentinel, and memory comes from cpu_rss_peak."""
    n = len(STEPS)
    sentinel = -1 / 1024**3

    def cpu_series(rss0: float, tps: float) -> dict[str, list[float]]:
        s = gpu_series(1.0, 8.0, tps, 11.0)
        s["memory/max_reserved(GiB)"] = [sentinel] * n
        s["memory/max_active(GiB)"] = [sentinel] * n
        s["memory/cpu_rss_peak(GiB)"] = [rss0 + 0.01 * i for i in range(n)]
        return s

    va = write_run(tmp_path / "cpu_a", cpu_series(2.0, 900.0))
    vb = write_run(tmp_path / "cpu_b", cpu_series(1.5, 1000.0))
    _, col, rows = report_table(report_inproc, tmp_path / "rep", tmp_path / "cpu_a", tmp_path / "cpu_b")
    tag = "memory/cpu_rss_peak(GiB)"
    ea, eb = expected_stats(va, tag), expected_stats(vb, tag)
    assert rows[1][col["memory tag"]] == f"`{tag}`"
    check_cell(rows[1][col["peak memory"]], eb["peak"], "cpu peak")
    check_cell(rows[1][col["steady memory ratio"]], eb["steady"] / ea["steady"], "cpu steady ratio")


def test_cpu_tags_as_platform_renames_them(tmp_path, report_inproc):
    """parallel/cpu_shims.py renames max_reserved -> cpu_rss_peak, max_active -> cpu_rss_current on CPU."""
    n = len(STEPS)

    def renamed(peak0: float) -> dict[str, list[float]]:
        s = gpu_series(1.0, 8.0, 900.0, 11.0)
        for k in [k for k in s if k.startswith("memory/")]:
            del s[k]
        s["memory/cpu_rss_current(GiB)"] = [peak0 - 0.2 + 0.001 * i for i in range(n)]
        s["memory/cpu_rss_current(%)"] = [3.0] * n
        s["memory/cpu_rss_peak(GiB)"] = [peak0 + 0.002 * i + (0.5 if i == 2 else 0) for i in range(n)]
        s["memory/cpu_rss_peak(%)"] = [4.0] * n
        return s

    va = write_run(tmp_path / "a", renamed(1.2))
    vb = write_run(tmp_path / "b", renamed(0.9))
    _, col, rows = report_table(report_inproc, tmp_path / "rep", tmp_path / "a", tmp_path / "b")
    tag = "memory/cpu_rss_peak(GiB)"
    ea, eb = expected_stats(va, tag), expected_stats(vb, tag)
    for row, e in ((rows[0], ea), (rows[1], eb)):
        assert row[col["memory tag"]] == f"`{tag}`"
        check_cell(row[col["peak memory"]], e["peak"], "peak")
        check_cell(row[col["steady memory"]], e["steady"], "steady")
        check_cell(row[col["peak memory ratio"]], e["peak"] / ea["peak"], "peak ratio")


def test_mixed_memory_tags_ratio_na(tmp_path, report_inproc):
    """A GPU run against a CPU run: no common memory tag, so the memory ratios are n/a and a warning is shown."""
    write_run(tmp_path / "gpu", gpu_series(10.0, 8.0, 40000.0, 11.0))
    s = gpu_series(1.0, 8.0, 900.0, 11.0)
    for k in [k for k in s if k.startswith("memory/")]:
        del s[k]
    s["memory/cpu_rss_peak(GiB)"] = [3.0] * len(STEPS)
    write_run(tmp_path / "cpu", s)
    md, col, rows = report_table(report_inproc, tmp_path / "rep", tmp_path / "gpu", tmp_path / "cpu")
    assert "Warning" in md
    assert rows[1][col["memory tag"]] == "`memory/cpu_rss_peak(GiB)`"
    assert rows[1][col["peak memory ratio"]] == "n/a"
    assert rows[1][col["median tps ratio"]] != "n/a"


def test_refuses_empty_folder(two_runs, tmp_path):
    a_dir, *_ = two_runs
    empty = tmp_path / "empty_run"
    empty.mkdir()
    res = run_report(str(a_dir), str(empty), "--out", str(tmp_path / "rep"))
    assert res.returncode == 2
    assert str(empty) in res.stderr
    assert "no TensorBoard event files" in res.stderr
    assert not (tmp_path / "rep" / "report.md").exists()


def test_refuses_missing_path(two_runs, tmp_path, report_inproc):
    a_dir, *_ = two_runs
    missing = tmp_path / "nope"
    res = report_inproc(str(a_dir), str(missing), "--out", str(tmp_path / "rep"))
    assert res.returncode == 2 and str(missing) in res.stderr


def test_refuses_missing_required_tag(two_runs, tmp_path, report_inproc):
    a_dir, *_ = two_runs
    s = gpu_series(10.0, 8.0, 40000.0, 11.0)
    del s["throughput(tps)"]
    bad = tmp_path / "no_tps"
    write_run(bad, s)
    res = report_inproc(str(a_dir), str(bad), "--out", str(tmp_path / "rep"))
    assert res.returncode == 2
    assert str(bad) in res.stderr and "throughput(tps)" in res.stderr


def test_refuses_run_without_memory(two_runs, tmp_path, report_inproc):
    a_dir, *_ = two_runs
    s = gpu_series(10.0, 8.0, 40000.0, 11.0)
    for k in [k for k in s if k.startswith("memory/")]:
        del s[k]
    s["memory/max_reserved(%)"] = [5.0] * len(STEPS)  # a percentage is not a memory amount
    bad = tmp_path / "no_mem"
    write_run(bad, s)
    res = report_inproc(str(a_dir), str(bad), "--out", str(tmp_path / "rep"))
    assert res.returncode == 2
    assert str(bad) in res.stderr and "memory/" in res.stderr


def test_refuses_ambiguous_parent(tmp_path, report_inproc):
    parent = tmp_path / "dump"
    write_run(parent / "tb" / "20261122-0230", gpu_series(10.0, 8.0, 40000.0, 11.0))
    write_run(parent / "tb" / "20261122-0300", gpu_series(10.0, 8.0, 40000.0, 11.0))
    other = tmp_path / "other"
    write_run(other, gpu_series(10.0, 8.0, 40000.0, 11.0))
    res = report_inproc(str(parent), str(other), "--out", str(tmp_path / "rep"))
    assert res.returncode == 2
    assert str(parent) in res.stderr and "20261122-0230" in res.stderr and "20261122-0300" in res.stderr


def test_refuses_bad_labels(two_runs, tmp_path, report_inproc):
    a_dir, b_dir, *_ = two_runs
    res = report_inproc(str(a_dir), str(b_dir), "--out", str(tmp_path / "rep"), "--labels", "only_one")
    assert res.returncode == 2 and "--labels" in res.stderr


def test_duplicate_steps_last_write_wins(tmp_path):
    """A restart into the same folder rewrites steps: the report uses the last value written."""
    from benchmarks.tb_events import load_scalars
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path))
    for step, v in ((1, 5.0), (10, 4.0), (10, 3.5), (20, 3.0)):
        w.add_scalar("loss_metrics/global_avg_loss", v, step)
    w.close()
    assert load_scalars(str(tmp_path))["loss_metrics/global_avg_loss"] == [(1, 5.0), (10, 3.5), (20, 3.0)]


def test_fmt():
    assert fmt(1.23456) == "1.235"
    assert fmt(0.012345) == "0.01235"
    assert fmt(48213.37) == "48213"
    assert fmt(1234.5) == "1234" or fmt(1234.5) == "1235"
    assert fmt(None) == "n/a"
    assert fmt(0.0) == "0"
    assert fmt(1.0) == "1"


# ---------------------------------------------------------------- runs sharing a folder, the picture


def test_warns_when_a_folder_holds_several_runs(tmp_path, report_inproc):
    """Two jobs started in one minute used to land in one TensorBoard folder: say so."""
    shared = tmp_path / "dump" / "tb" / "20261122-0230"
    write_run(shared, gpu_series(10.0, 8.0, 40000.0, 11.0))
    write_run(shared, gpu_series(6.5, 8.1, 52000.0, 10.5))  # a second writer, same folder
    write_run(tmp_path / "other", gpu_series(10.0, 8.0, 40000.0, 11.0))
    res = report_inproc(str(tmp_path / "dump"), str(tmp_path / "other"), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    assert "warning" in res.stderr and str(shared) in res.stderr and "2 event files" in res.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "**Warning:**" in md and "several runs" in md
    summary = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["event_files"] for r in summary["runs"]] == [2, 1] and len(summary["warnings"]) == 1
    # one run per folder: no warning
    res = report_inproc(str(tmp_path / "other"), str(tmp_path / "other"), "--out", str(tmp_path / "rep2"),
                        "--labels", "a,b")
    assert res.returncode == 0 and "event files" not in res.stderr


def _noisy_series(tps: list[float]) -> dict[str, list[float]]:
    s = gpu_series(10.0, 8.0, 1.0, 11.0)
    s["throughput(tps)"] = tps
    return s


def test_noisy_tps_ratio_is_flagged_not_reported(tmp_path, report_inproc):
    """A 0.9x tps ratio inside a +-10% step-to-step spread is noise; 0.5x with a 1% spread is not."""
    jitter = [1.0, 1.1, 0.9, 1.05, 0.95, 1.1, 0.9, 1.0, 1.08]  # IQR/median ~ 0.15
    write_run(tmp_path / "base", _noisy_series([100 * j for j in jitter]))
    write_run(tmp_path / "slow", _noisy_series([90 * j for j in jitter]))
    write_run(tmp_path / "half", _noisy_series([50.0 * (1 + 0.001 * i) for i in range(len(STEPS))]))
    write_run(tmp_path / "steady", _noisy_series([100.0 * (1 + 0.001 * i) for i in range(len(STEPS))]))
    md, col, rows = report_table(report_inproc, tmp_path / "rep", tmp_path / "base", tmp_path / "slow")
    assert rows[1][col["median tps ratio"]] == f"{fmt(0.9)} (noisy)"
    assert "**Noisy throughput:**" in md and "not a finding" in md
    summary = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert summary["runs"][1]["median_tps_ratio_noisy"] is True
    assert summary["runs"][0]["tps_spread"] == pytest.approx(
        (np.percentile([f32(100 * j) for j in jitter[1:]], 75) - np.percentile([f32(100 * j) for j in jitter[1:]], 25))
        / statistics.median([f32(100 * j) for j in jitter[1:]]))
    md, col, rows = report_table(report_inproc, tmp_path / "rep2", tmp_path / "steady", tmp_path / "half")
    assert rows[1][col["median tps ratio"]] == fmt(statistics.median(
        [f32(50.0 * (1 + 0.001 * i)) for i in range(len(STEPS))]) / statistics.median(
        [f32(100.0 * (1 + 0.001 * i)) for i in range(len(STEPS))]))
    assert "Noisy" not in md


def _seeded_run(folder: Path, seed: str | None, tps: float) -> None:
    """A run as the trainer writes it: the scalars plus, unless None, debug.seed as a text tag."""
    from torch.utils.tensorboard import SummaryWriter

    from parallel.metrics import SEED_TAG

    with SummaryWriter(str(folder)) as writer:  # one writer, one event file: one run
        if seed is not None:
            writer.add_text(SEED_TAG, seed, 0)
        for i, step in enumerate(STEPS):
            for tag, values in gpu_series(10.0, 8.0, tps, 11.0).items():
                writer.add_scalar(tag, values[i], step)


@pytest.mark.parametrize("seeds, warning", [
    (("42", "42"), None),
    (("42", "7"), "different seeds ('baseline' 42, 'fused' 7)"),
    (("None", "None"), "run(s) 'baseline', 'fused' set no seed (debug.seed)"),
    ((None, "42"), "run(s) 'baseline' set no seed (debug.seed), or did not record it"),
], ids=["same", "different", "unset", "not-recorded"])
def test_warns_unless_the_runs_share_a_seed(tmp_path, report_inproc, seeds, warning):
    for name, seed in zip(("a", "b"), seeds):
        _seeded_run(tmp_path / name, seed, 40000.0)
    res = report_inproc(str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "rep"),
                        "--labels", "baseline,fused")
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    if warning is None:
        assert "warning" not in res.stderr and "**Warning:**" not in md
    else:
        assert warning in res.stderr and "same --debug.seed" in res.stderr
        assert "**Warning:**" in md and warning in md


def test_picture(two_runs, tmp_path):
    """Title names both runs; both loss lines and their difference; memory from 0; integer steps."""
    a_dir, b_dir, va, vb = two_runs
    runs = [compare_runs.load_run(str(a_dir), "baseline"), compare_runs.load_run(str(b_dir), "fused")]
    summary = compare_runs.summarize(runs)
    fig = compare_runs.figure(runs, summary)
    title = fig._suptitle.get_text()
    assert title.startswith("fused vs baseline: peak memory ") and "baseline: baseline" not in title
    panels = {ax.get_title().split(" (")[0].split(":")[0]: ax for ax in fig.axes if ax.axison}
    assert set(panels) >= {"loss", "loss difference", "memory", "throughput", "fused_ce/lse_mean"}
    loss_lines = [l for l in panels["loss"].get_lines()]
    assert [l.get_label() for l in loss_lines] == ["baseline", "fused"]
    assert loss_lines[0].get_linewidth() > 2 * loss_lines[1].get_linewidth()  # the baseline shows underneath
    (diff,) = [l for l in panels["loss difference"].get_lines() if l.get_label().startswith("fused")]
    want = [(b - a) / a for a, b in zip(va["loss_metrics/global_avg_loss"], vb["loss_metrics/global_avg_loss"])]
    assert list(diff.get_xdata()) == STEPS and np.allclose(diff.get_ydata(), want, rtol=1e-5)
    assert panels["memory"].get_ylim()[0] == 0 and panels["throughput"].get_ylim()[0] == 0
    fig.canvas.draw()
    for ax in panels.values():
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_report_output_is_git_ignored():
    proc = subprocess.run(["git", "check-ignore", "-q", "report/report.png"], cwd=REPO)
    assert proc.returncode == 0, "report/ (the README's --out) must be git-ignored"
    proc = subprocess.run(["git", "check-ignore", "-q", "benchmarks/report/report.png"], cwd=REPO)
    assert proc.returncode == 1, "the checked-in pictures under benchmarks/report/ must stay tracked"
