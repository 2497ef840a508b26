"""parallel/tensorboard_run.py: a killed process keeps what it logged; a restarted one continues
the same TensorBoard run, each step shown once (the job-level proof: tests/jobs/test_restart.py)."""

import subprocess
import sys

from conftest import ROOT

from benchmarks.tb_events import shown_steps

# One process of a job: logs `steps` into `folder`, then is SIGKILLed at once (no teardown).
_LOG_AND_DIE = """
import os, signal, sys
from parallel import patches
patches.apply()
from parallel.tensorboard_run import ContinuedTensorBoardLogger
logger = ContinuedTensorBoardLogger(sys.argv[1])
for step in map(int, sys.argv[2:]):
    logger.log({"loss": float(step)}, step)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _log_and_die(folder, steps):
    proc = subprocess.run([sys.executable, "-c", _LOG_AND_DIE, str(folder), *map(str, steps)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-3000:]


def test_a_killed_process_keeps_the_steps_it_logged(tmp_path):
    _log_and_die(tmp_path, range(1, 7))
    assert shown_steps(tmp_path, "loss") == [1, 2, 3, 4, 5, 6]


def test_a_restart_replaces_the_steps_it_runs_again(tmp_path):
    """Killed after step 6, resumed from the checkpoint at step 4: steps 5 and 6 once, the
    restarted process's."""
    _log_and_die(tmp_path, range(1, 7))
    _log_and_die(tmp_path, range(5, 9))
    assert shown_steps(tmp_path, "loss") == [1, 2, 3, 4, 5, 6, 7, 8]
