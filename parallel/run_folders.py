"""One TensorBoard folder per run, on every device; installed by parallel.patches.

torchtitan names the folder to the minute, so two short runs into one dump folder would share it.
Here it is `<run_name()>-fused` or `-baseline` (the time to the second plus the launcher's pid; all
ranks of one job use the same name, parallel/launch.py), and it holds the run's seed (SEED_TAG).
"""

import os
import time

from parallel.metrics import SEED_TAG

RUN_ENV = "FUSED_CE_RUN"  # set by parallel/launch.py, so that every rank of a job names the same run


_run_name: str | None = None


def run_name() -> str:
    """This job's TensorBoard run name (its folder adds -fused or -baseline): $FUSED_CE_RUN, else
    the time to the second plus this pid.
    Kept in this process only: processes it starts (tests' jobs) must name their own runs."""
    global _run_name
    if _run_name is None:
        _run_name = os.environ.get(RUN_ENV) or f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    return _run_name


class _RunFolderClock:
    """Stands in for `datetime` in torchtitan's metrics module, whose one use of it names the run
    folder to the minute: two short runs started in one minute then share a folder."""

    def __init__(self, folder: str):
        self.folder = folder

    def now(self):
        return self

    def strftime(self, fmt: str) -> str:
        return self.folder


def install() -> None:
    """Each run's TensorBoard folder is `<run_name()>-fused` or `-baseline`, and holds its seed (SEED_TAG)."""
    from torchtitan.components import metrics

    build = metrics._build_metric_logger

    def build_in_run_folder(job_config, *args, **kwargs):
        fused_ce = getattr(job_config, "fused_ce", None)  # absent without parallel.config
        head = "fused" if fused_ce is not None and fused_ce.enable else "baseline"
        metrics.datetime = _RunFolderClock(f"{run_name()}-{head}")
        metric_logger = build(job_config, *args, **kwargs)
        # torchtitan's LoggerContainer keeps its loggers private; the TensorBoard one has the writer.
        for each in getattr(metric_logger, "_loggers", ()):
            if isinstance(each, metrics.TensorBoardLogger):
                each.writer.add_text(SEED_TAG, str(job_config.debug.seed), 0)
        return metric_logger

    metrics._build_metric_logger = build_in_run_folder
