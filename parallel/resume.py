"""Resuming from a checkpoint: the step said, incomplete checkpoints named, the head's state kept.

torchtitan (CheckpointManager.load) resumes from the newest `step-N` folder that holds DCP's
`.metadata`. DCP writes that file last, once every rank's data is written, through a temporary
file and a rename: a save that a kill interrupted has none and is never loaded. `attach()` adds
to the trainer's CheckpointManager:

- a log line saying which step the job resumed from, and which newer `step-N` folders it passed
  over as incomplete (their save did not finish; the next save of that step overwrites them);
- the fused head's statistics since the last log step (FusedCEStats: each rank's own sums, under
  its rank) in the checkpoint, so that the first fused_ce/* values logged after a resume cover
  the same steps as an uninterrupted run's. A checkpoint without them (saved with the head off)
  still loads: that window then starts empty, and the log says so.
"""

import os
import re

from torch.distributed.checkpoint import FileSystemReader
from torchtitan.tools.logging import logger

STATS_KEY = "fused_ce_stats"  # the checkpoint's top-level key of FusedCEStats
_STEP_FOLDER = re.compile(r"step-(\d+)")


def _complete(folder: str) -> bool:
    # The two files torchtitan's _find_load_step accepts: DCP's, or a HF safetensors index.
    return any(os.path.isfile(os.path.join(folder, name))
               for name in (".metadata", "model.safetensors.index.json"))


def incomplete_after(folder: str, step: int) -> list[str]:
    """The `step-N` folders in `folder` with N > step whose save did not finish, oldest first."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        match = _STEP_FOLDER.fullmatch(name)
        if match and int(match.group(1)) > step and not _complete(os.path.join(folder, name)):
            found.append((int(match.group(1)), name))
    return [name for _, name in sorted(found)]


def _has_stats(checkpoint_id: str) -> bool:
    keys = FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    return any(key.startswith(STATS_KEY + ".") for key in keys)


def attach(trainer) -> None:
    """Add the above to `trainer.checkpointer` (after Trainer.__init__, before train())."""
    checkpointer = trainer.checkpointer
    if not checkpointer.enable:
        return
    head = trainer.fused_head
    if head is not None:
        checkpointer.states[STATS_KEY] = head.stats
    dcp_load, load = checkpointer.dcp_load, checkpointer.load

    def dcp_load_keeping_head_state(state_dict, checkpoint_id, from_hf, from_quantized):
        if STATS_KEY in state_dict and not from_hf and not _has_stats(checkpoint_id):
            state_dict = {k: v for k, v in state_dict.items() if k != STATS_KEY}
            logger.info(f"[fused_ce] {checkpoint_id} holds no fused-head statistics (saved with the "
                        "head off): the fused_ce/* values first logged cover the steps from here on")
        return dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)

    def load_saying_step(*args, **kwargs):
        loaded = load(*args, **kwargs)
        if loaded and os.path.isdir(checkpointer.folder):
            skipped = incomplete_after(checkpointer.folder, trainer.step)
            note = (f"; passed over {', '.join(skipped)}: incomplete (the save did not finish)"
                    if skipped else "")
            logger.info(f"[checkpoint] resumed from step {trainer.step} "
                        f"({os.path.join(checkpointer.folder, f'step-{trainer.step}')}){note}")
        return loaded

    checkpointer.dcp_load = dcp_load_keeping_head_state  # called by load() through self
    checkpointer.load = load_saying_step
