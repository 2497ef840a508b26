"""torchrun, except that a refused job ends with its one message and exit code 2.

run_train.sh starts the ranks through this (`python -m parallel.launch <torchrun args>`).
torchrun turns any rank's non-zero exit into ~30 lines of ChildFailedError traceback and
exit code 1, burying a configuration error under launcher noise. Here each rank that
refuses its job (parallel.train: JobRefused) writes the message into a folder named by
$FUSED_CE_REFUSALS (parallel.refusals); when the ranks fail and that folder holds a
message, the launcher's own failure logs are dropped, the message is printed once more as
the last line of stderr, and the exit code is 2. A rank that exits 2 by itself (an unknown option: tyro's
message) ends the launch with exit code 2 and no traceback as well. Every other failure
is torchrun's, unchanged. It also names this job's TensorBoard run folder once, for all
its local ranks (run_folders.run_name).

On multi-node each node's launcher runs the job's start-up checks itself before it joins the
rendezvous (parallel.train.check_start_up), so a refused job never depends on another node:
node 0's launcher hosts torchrun's store and, once its ranks refused, exits with it, and a node
whose ranks were still starting then lost the store and ended with torchrun's
RendezvousConnectionError traceback, exit 1; nor does a refused node wait for its peers to
join. One process per node pays the checks' few seconds; a single node needs none of this (its
launcher outlives its ranks).
"""

import logging
import os
import shutil
import sys
import tempfile

from parallel import run_folders
from parallel.refusals import REFUSALS_ENV, refusal

USAGE_ERROR = 2  # a refused job's exit code, and a command-line parser's (tyro, argparse)
TRAINER = "parallel.train"  # the module whose start-up checks a multi-node launcher runs first


class _QuietAfterRefusal(logging.Filter):
    """Drops torchrun's failure reports once a rank has refused (they would follow the message)."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("torch.distributed"):
            return True
        usage_error = record.getMessage().startswith(f"failed (exitcode: {USAGE_ERROR})")
        return not (usage_error or refusal(self.folder))


def _refusal_before_rendezvous(argv: list[str]) -> str | None:
    """Multi-node, parallel.train only: the message of the job's start-up checks, run here."""
    from torch.distributed import run

    args = run.parse_args(argv)
    if run.parse_min_max_nnodes(args.nnodes)[1] == 1 or not args.module or args.training_script != TRAINER:
        return None
    from parallel.train import check_start_up, JobRefused  # first: it patches torchtitan before its import

    from torchtitan.config import ConfigManager

    logging.disable(logging.WARNING)  # the ranks log the checks' notes and warnings; here only a refusal counts
    try:
        check_start_up(ConfigManager().parse_args(args.training_script_args))
    except JobRefused as e:
        return str(e)
    finally:
        logging.disable(logging.NOTSET)
    return None


def main(argv: list[str]) -> int:
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if (message := _refusal_before_rendezvous(argv)) is not None:
        print(message, file=sys.stderr, flush=True)
        return USAGE_ERROR

    folder = tempfile.mkdtemp(prefix="fused_ce_refusals_")
    os.environ[REFUSALS_ENV] = folder  # the ranks inherit it
    os.environ[run_folders.RUN_ENV] = run_folders.run_name()  # one TensorBoard run name for all local ranks
    quiet = _QuietAfterRefusal(folder)
    handlers = {h for name in ("", "torch", "torch.distributed") for h in logging.getLogger(name).handlers}
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        run.main(argv)
    except ChildFailedError as e:
        message = refusal(folder)
        if message is not None:
            print(message, file=sys.stderr, flush=True)
            return USAGE_ERROR
        if e.get_first_failure()[1].exitcode == USAGE_ERROR:
            return USAGE_ERROR  # e.g. an unknown option: the rank's own message (tyro's) is above
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
