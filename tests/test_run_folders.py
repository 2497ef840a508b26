"""Every run gets its own TensorBoard folder (issue 16 item 5).

torchtitan names the folder to the minute, so two short runs into one dump folder used to
share it (and a report then saw one run). parallel/cpu_shims.py names it to the second plus
the launcher's pid, then -fused or -baseline; all ranks of one job use the same name.
"""

import os

import pytest

from conftest import FAST, run_train
from parallel import cpu_shims

QUICK = (*FAST, "--training.steps", "1", "--validation.no-enable")


def test_run_name_stays_in_its_process(monkeypatch):
    """A name picked in-process (tests build trainers in pytest) must not leak into the jobs it starts."""
    monkeypatch.delenv(cpu_shims.RUN_ENV, raising=False)
    monkeypatch.setattr(cpu_shims, "_run_name", None)
    name = cpu_shims.run_name()
    assert name.endswith(f"-{os.getpid()}") and cpu_shims.run_name() == name
    assert cpu_shims.RUN_ENV not in os.environ


@pytest.mark.slow
def test_two_runs_into_one_dump_get_two_folders(tmp_path):
    run_train(tmp_path, *QUICK)
    run_train(tmp_path, *QUICK, "--fused_ce.enable")
    runs = sorted(p.name for p in (tmp_path / "tb").iterdir())
    assert len(runs) == 2, runs
    assert sorted(run.rsplit("-", 1)[1] for run in runs) == ["baseline", "fused"]  # the name says which head
    assert all(list((tmp_path / "tb" / run).glob("events.out.tfevents.*")) for run in runs)


@pytest.mark.slow
def test_ranks_of_one_job_share_its_folder(tmp_path):
    run_train(tmp_path, *QUICK, "--metrics.save_for_all_ranks", env={"NGPU": "2"})
    (run,) = (tmp_path / "tb").iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["rank_0", "rank_1"]
