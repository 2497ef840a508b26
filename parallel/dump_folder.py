"""The start-up check that the job's output can be written: JobRefused before any step runs.

torchtitan writes into `job.dump_folder` (TensorBoard events, traces) and its checkpoint folder
only when it first gets there: a folder it cannot write, or a disk without room for the first
checkpoint, used to fail the job at its first log or checkpoint step, after the work of every
step before it (and, with MAX_RESTARTS, again after each restart). Checked here:

- every folder the job writes can take a new file (created where it does not exist yet: the
  nearest folder that exists must take one);
- with `[checkpoint] enable`, the disk of the checkpoint folder has room for the first
  checkpoint: the fp32 weights, plus Adam's two moments unless that first save is the last
  step's model-only export. The estimate counts the model's parameters on the meta device; the
  checkpoint's small parts (data loader, step counters) are left out, so it errs low, never high.
"""

import os
import shutil
import tempfile

import torch
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.protocols.train_spec import get_train_spec
from torchtitan.tools.logging import logger

from parallel.specs import JobRefused

_GIB = 2**30


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _check_writable(path: str, setting: str) -> None:
    where = _nearest_existing(path)
    try:
        if not os.path.isdir(where):
            raise NotADirectoryError(f"{where} is a file")
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        raise JobRefused(f"{setting}={path!r} cannot be written ({reason}: {where}); point it at a "
                         f"folder this job can write, e.g. --{setting} ./outputs/my_job") from None


def _n_params(job_config) -> int | None:
    """The model's parameter count (shared ones once), or None for a model torchtitan will
    refuse itself (an unknown name or flavor: its own message says which) or one that cannot
    be built from its args alone (a warning says the space check is skipped)."""
    try:
        spec = get_train_spec(job_config.model.name)
        args = spec.model_args[job_config.model.flavor]
    except (ValueError, KeyError, ImportError):
        return None
    try:
        with torch.device("meta"):
            model = spec.model_cls(args)
    except Exception as e:
        logger.warning(f"[checkpoint] the free-space check for the first checkpoint is skipped: "
                       f"building model.name={job_config.model.name!r} on the meta device to count "
                       f"its parameters failed ({type(e).__name__}: {e})")
        return None
    return sum(p.numel() for p in model.parameters())


def first_checkpoint(job_config, n_params: int) -> tuple[int, int, str]:
    """(step, bytes, what) of the job's first checkpoint save."""
    ckpt, steps = job_config.checkpoint, job_config.training.steps
    step = 1 if ckpt.enable_first_step_checkpoint else min(ckpt.interval, steps)
    if step == steps and ckpt.last_save_model_only:
        dtype = TORCH_DTYPE_MAP[ckpt.export_dtype]
        return step, n_params * dtype.itemsize, f"the model-only export in {ckpt.export_dtype}"
    # torchtitan's optimizers are Adam and AdamW: two fp32 moments per parameter
    return step, n_params * 4 * 3, f"fp32 weights and {job_config.optimizer.name} moments"


def check_dump_folder(job_config) -> None:
    """JobRefused, in one line naming the setting, if the job's output cannot be written."""
    dump = job_config.job.dump_folder
    _check_writable(dump, "job.dump_folder")
    ckpt = job_config.checkpoint
    if not ckpt.enable or ckpt.load_only:
        return
    folder = os.path.join(dump, ckpt.folder)  # an absolute checkpoint.folder stands alone
    setting, value = ("checkpoint.folder", ckpt.folder) if os.path.isabs(ckpt.folder) else ("job.dump_folder", dump)
    if setting == "checkpoint.folder":
        _check_writable(folder, setting)
    n_params = _n_params(job_config)
    if n_params is None:
        return
    step, need, what = first_checkpoint(job_config, n_params)
    where = _nearest_existing(folder)
    free = shutil.disk_usage(where).free
    if need > free:
        raise JobRefused(
            f"{setting}={value!r}: the first checkpoint (step {step}: {what} of "
            f"{n_params / 1e9:.2f}B parameters) needs about {need / _GIB:.1f} GiB, but {where} has "
            f"{free / _GIB:.1f} GiB free; free some space, point --{setting} at a larger disk, "
            "or turn checkpoints off with --checkpoint.no-enable"
        )
