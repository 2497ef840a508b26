"""Every run gets its own TensorBoard folder.

torchtitan names the folder to the minute, so two short runs into one dump folder used to
share it (and a report then saw one run). parallel/run_folders.py names it to the second plus
the launcher's pid, then -fused or -baseline; all ranks of one job use the same name.
"""

import os

import pytest

from conftest import FAST, run_train
from parallel import run_folders

QUICK = (*FAST, "--training.steps", "1", "--validation.no-enable")


def test_run_name_stays_in_its_process(monkeypatch):
    """A name picked in-process (tests build trainers in pytest) must not leak into the jobs it starts."""
    monkeypatch.delenv(run_folders.RUN_ENV, raising=False)
    monkeypatch.setattr(run_folders, "_run_name", None)
    name = run_folders.run_name()
    assert name.endswith(f"-{os.getpid()}") and run_folders.run_name() == name
    assert run_folders.RUN_ENV not in os.environ


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


def test_the_seed_reaches_tensorboard_through_the_cpu_memory_tags(tmp_path, monkeypatch):
    """The run-folder wrapper writes the seed through the TensorBoard logger inside torchtitan's
    LoggerContainer; on the CPU the memory-tag wrapper goes around it. Installed the other way
    round (the memory-tag wrapper inside), the container is hidden and no seed is written."""
    import torch
    from torchtitan.components import metrics
    from torchtitan.config import JobConfig

    from benchmarks.tb_events import event_files, load_texts
    from parallel import cpu_shims
    from parallel.metrics import SEED_TAG

    assert cpu_shims.applied()  # the conftest applied the patches, on a CPU-only machine
    config = JobConfig()
    config.job.dump_folder = str(tmp_path)
    config.metrics.enable_tensorboard = True
    config.metrics.save_for_all_ranks = True  # no process group needed to pick the logging rank
    config.debug.seed = 1234
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
    metric_logger = metrics._build_metric_logger(config, None)
    assert isinstance(metric_logger, cpu_shims._RenameMemoryTags)  # the memory tags: outermost
    metric_logger.close()
    (run,) = (tmp_path / "tb").iterdir()
    assert run.name.endswith("-baseline")
    folder = run / "rank_0"
    assert event_files(folder)
    assert load_texts(folder).get(SEED_TAG) == "1234"
