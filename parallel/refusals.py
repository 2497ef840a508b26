"""A refused job's message, from its ranks to run_train.sh's launcher (parallel.launch): each
rank that refuses writes it into the folder $FUSED_CE_REFUSALS names, and the launcher prints
it once, last. Apart from both, so that the trainer and the launcher do not import each other."""

import os
from pathlib import Path

REFUSALS_ENV = "FUSED_CE_REFUSALS"


def record_refusal(message: str) -> bool:
    """Called by a rank that refuses its job; whether the launcher will print the message
    (False outside this launcher: the rank must say it itself)."""
    folder = os.environ.get(REFUSALS_ENV)
    if not folder or not os.path.isdir(folder):
        return False
    rank = os.environ.get("LOCAL_RANK", "0")
    tmp = Path(folder) / f".rank{rank}.tmp"
    tmp.write_text(message)
    tmp.replace(Path(folder) / f"rank{rank}")  # atomic: the launcher never reads half a message
    return True


def refusal(folder: str) -> str | None:
    """The first rank's message in `folder`, or None while no rank has refused."""
    for path in sorted(Path(folder).glob("rank*")):
        if message := path.read_text().strip():
            return message
    return None
