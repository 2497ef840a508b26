"""A job's TensorBoard run continues across torchrun restarts: every step shows once, none is lost.

torchrun restarts a failed group from the same launcher, so the restarted processes keep the
run's folder name ($FUSED_CE_RUN, parallel/launch.py) and write a new event file into the same
folder. torchtitan's TensorBoardLogger needs two more things for that to read as one run:

- Its SummaryWriter hands the events to a thread that writes them when it gets to them: a rank 0
  killed right after a log step loses them, and with them steps the checkpoint covers, which the
  restarted job does not run again. Here each log call returns once its events are written.
- The restarted job logs again the steps after its checkpoint that the killed attempt had logged
  already. The first event of each process marks a restart at its step (TensorBoard's purge
  step, as `SummaryWriter(purge_step=...)` writes it): TensorBoard drops the earlier attempts'
  events from that step on. A fresh job's first step marks nothing older than itself.

`install()` makes torchtitan build this logger (parallel/train.py calls it before the trainer).
"""

from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from torchtitan.components import metrics


class ContinuedTensorBoardLogger(metrics.TensorBoardLogger):
    """torchtitan's TensorBoard logger, each log written before it returns, marking where this
    process starts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._restart_marked = False

    def log(self, metrics: dict, step: int) -> None:
        if not self._restart_marked:
            self.writer.file_writer.add_event(
                Event(step=step, session_log=SessionLog(status=SessionLog.START))
            )
            self._restart_marked = True
        super().log(metrics, step)
        self.writer.flush()


def install() -> None:
    metrics.TensorBoardLogger = ContinuedTensorBoardLogger  # _build_metric_logger looks it up per call
