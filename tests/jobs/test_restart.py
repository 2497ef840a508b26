"""A killed rank costs the steps since the last checkpoint, nothing more.

torchrun restarts the group (run_train.sh: MAX_RESTARTS); the job resumes from its last
complete checkpoint, says which, and finishes with the losses, grad norms and fused-CE
statistics of an uninterrupted run, bit for bit (fp32, debug.deterministic), its TensorBoard
run continued in the same folder. benchmarks/e2e/kill_resume.py does the kill and the comparison.
"""

import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import assert_close, FAST, losses, ROOT, run_train

from benchmarks.e2e import kill_resume
from benchmarks.tb_events import shown_steps

pytestmark = pytest.mark.slow  # torchrun jobs

# A log step every 3 steps, a checkpoint every 4: the fused-CE window of log step 6 spans the
# checkpoint at step 4, so a resume from there must restore the window's first step.
JOB = [*FAST, "--metrics.log_freq", "3", "--validation.no-enable"]
FUSED = "--fused_ce.enable"
DEBUG_CONFIG = str(ROOT / "train_configs" / "debug_model.toml")


def test_killed_rank_resumes_as_if_uninterrupted(tmp_path):
    """2 gloo ranks (FSDP), rank 0 SIGKILLed in step 7, between the checkpoints at 4 and 8.
    Rank 0 is the one that writes TensorBoard: the steps it logged before the checkpoint must
    be on disk when it dies, since the restarted job does not run them again."""
    cmp = kill_resume.run(tmp_path, DEBUG_CONFIG, ngpu=2, steps=12, interval=4, kill_after=6,
                          kill_rank=0, tol=0.0, extra=[*JOB, FUSED], timeout=300)
    assert cmp.ok, kill_resume.report(cmp)


def _resumed(output: str) -> list[str]:
    return re.findall(r"\[checkpoint\] resumed from step .*", re.sub(r"\x1b\[[0-9;]*m", "", output))


def test_half_written_checkpoint_is_passed_over(tmp_path):
    """What a kill during the save of step 6 leaves (data files cut short, DCP's .metadata only
    begun as its temporary file) is never loaded: the job resumes from step 3 and says so."""
    steps = ("--training.steps", "6", "--checkpoint.enable", "--checkpoint.interval", "3")
    env = {"FUSED_CE_RUN": "one_run"}  # a relaunch continues the first launch's TensorBoard run
    run_train(tmp_path, *JOB, *steps, FUSED, env=env)
    uninterrupted = losses(tmp_path)
    cut = tmp_path / "checkpoint" / "step-6"
    (cut / ".metadata").rename(cut / ".metadata.tmp")
    with open(cut / ".metadata.tmp", "r+b") as f:
        f.truncate(10)
    for data in cut.glob("*.distcp"):
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)

    proc, _ = run_train(tmp_path, *JOB, *steps, FUSED, env=env)
    assert _resumed(proc.stdout + proc.stderr) == [
        f"[checkpoint] resumed from step 3 ({tmp_path / 'checkpoint' / 'step-3'}); passed over "
        "step-6: incomplete (the save did not finish)"
    ]
    assert losses(tmp_path) == uninterrupted  # steps 4-6 again, in the same run, bit for bit
    assert (cut / ".metadata").is_file()  # saved again, whole


def test_baseline_checkpoint_resumes_fused_across_a_restart(tmp_path):
    """A checkpoint of the head off resumes a fused job, which a kill in step 7 then restarts
    from that same checkpoint: its losses follow the baseline run's."""
    baseline = tmp_path / "baseline"
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "4", "--training.steps", "8"]
    run_train(baseline, *FAST, "--validation.no-enable", *ckpt)
    fused = tmp_path / "fused"
    shutil.copytree(baseline / "checkpoint" / "step-4", fused / "checkpoint" / "step-4")
    job = kill_resume.run_job(fused, [*FAST, "--validation.no-enable", *ckpt, FUSED],
                              {"MAX_RESTARTS": "1", "CONFIG_FILE": DEBUG_CONFIG},
                              tmp_path / "fused.log", timeout=300, kill_after=6, kill_rank=0)
    assert job.killed_pid is not None and job.returncode == 0, job.output[-6000:]
    resumed = _resumed(job.output)
    assert len(resumed) == 2 and all(r.startswith("[checkpoint] resumed from step 4 ") for r in resumed)
    assert job.output.count("holds no fused-head statistics (saved with the head off)") == 2
    assert_close(losses(fused), losses(baseline), 1e-4, range(5, 9))
    assert shown_steps(fused / "tb", "fused_ce/lse_mean") == [5, 6, 7, 8]


@pytest.mark.parametrize("case", ["no permission", "no space"])
def test_unwritable_dump_folder_is_refused_at_start_up(tmp_path, case):
    from test_refusals import assert_refused

    if case == "no permission":
        dump = Path("/sys/fused_ce_dump")  # sysfs refuses new entries, also to root
        args, env = (), {"MAX_RESTARTS": "1"}  # refused again on the restart, said once
        message = f"job.dump_folder='{dump}' cannot be written ("
    else:
        # Llama 3 405B's first checkpoint (weights and Adam moments, 4.9 TB) fits on no CI disk.
        dump = tmp_path / "dump"
        if shutil.disk_usage(tmp_path).free > 5e12:
            pytest.skip("this disk has room for a 405B checkpoint")
        args = ("--model.flavor", "405B", "--checkpoint.enable")
        env = {"CONFIG_FILE": str(ROOT / "train_configs" / "llama3_8b.toml")}
        message = f"job.dump_folder='{dump}': the first checkpoint (step 500: fp32 weights and AdamW"
    proc, _ = run_train(dump, *args, env=env, check=False)
    assert_refused(proc, message)
    assert not re.search(r"step:\s+1\b", proc.stdout + proc.stderr)
    assert not os.path.exists(dump)


def test_max_restarts_must_be_a_whole_number(tmp_path):
    proc, _ = run_train(tmp_path, env={"MAX_RESTARTS": "three"}, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("run_train.sh: MAX_RESTARTS=three must be a whole number "
                                   "(torchrun --max-restarts)")
