"""The report on two real runs: the debug job with the fused head off and on, TensorBoard on.

The memory tags (process RSS on CPU) and the fused-CE tags must be in the event files, and the
report's PNG and table must show exactly the values in those events.
"""

import json
import subprocess
import sys

import pytest
from conftest import FAST, ROOT, run_train, scalars

from parallel.metrics import CPU_RSS_PEAK_TAG, LSE_MEAN_TAG, Z_LOSS_TAG

from benchmarks.bench_common import fmt

pytestmark = pytest.mark.slow  # two run_train.sh jobs

MEMORY = CPU_RSS_PEAK_TAG  # the CPU memory tag: the process's resident set


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    dumps = {}
    for mode, extra in (("baseline", ()), ("fused", ("--fused_ce.enable",)),
                        ("fused_again", ("--fused_ce.enable",))):
        dumps[mode] = tmp_path_factory.mktemp(mode)
        run_train(dumps[mode], *FAST, "--training.steps", "6", "--debug.deterministic", *extra)
    return dumps


def test_event_files_hold_memory_and_fused_ce_tags(runs):
    for dump in runs.values():
        assert len(scalars(dump, MEMORY)) == 6
    assert len(scalars(runs["fused"], LSE_MEAN_TAG)) == 6
    assert len(scalars(runs["fused"], Z_LOSS_TAG)) == 6


def test_fused_runs_repeat_bit_for_bit(runs):
    """Same job, same seed, twice: identical losses (no unordered atomics in the fused path)."""
    tag = "loss_metrics/global_avg_loss"
    assert scalars(runs["fused"], tag) == scalars(runs["fused_again"], tag)


def test_report_matches_the_events(runs, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare_runs", str(runs["baseline"]), str(runs["fused"]),
         "--labels", "baseline,fused", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    assert matplotlib.image.imread(out / "report.png").shape[2] in (3, 4)

    numbers = {row["label"]: row for row in json.loads((out / "report.json").read_text())["runs"]}
    table = (out / "report.md").read_text()
    for mode in ("baseline", "fused"):
        dump = runs[mode]
        loss = scalars(dump, "loss_metrics/global_avg_loss")
        memory = scalars(dump, MEMORY)
        assert numbers[mode]["final_loss"] == pytest.approx(loss[max(loss)], rel=1e-6)
        assert numbers[mode]["peak_memory"] == pytest.approx(max(memory.values()), rel=1e-6)
        for value in (loss[max(loss)], max(memory.values())):
            assert fmt(value) in table
