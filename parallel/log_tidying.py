"""torchtitan 0.2.2 log texts that mislead, rewritten or dropped, on every device (the MFU's
"n/a" on the CPU); installed by parallel.patches."""

import logging
import re
import warnings

import torch


class _LogText(logging.Filter):
    """Rewrites torchtitan log lines that mislead (it logs finished f-strings on the root logger)."""

    def __init__(self, cpu: bool):
        super().__init__()
        self.cpu = cpu

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("torchtitan version: "):
            # "... (0.0.0 means __version__ is not defined correctly)": a note to torchtitan's developers
            record.msg, record.args = f"torchtitan {record.args[0]}, torch {torch.__version__}", ()
        if isinstance(record.msg, str) and record.msg.startswith("model.safetensors.index.json not found"):
            # Every tokenizer-only hf_assets_path gets it; it says only that an HF-format checkpoint
            # (checkpoint.last_save_in_hf) is written as one file (the README's checkpoint section says so).
            return False
        if isinstance(record.msg, str) and record.msg.startswith("HF assets path ") and "does not exist" in record.msg:
            # parallel.train's start-up check says what stands in for it, or refuses the job
            return False
        if isinstance(record.msg, str) and not record.args:
            msg = re.sub(r"^(Building \S+ \S+)with ", r"\1 with ", record.msg)  # torchtitan's missing space
            if self.cpu:
                msg = msg.replace("mfu: nan%", "mfu: n/a")
                if msg.startswith("Peak FLOPS used for computing MFU"):
                    msg = "MFU: n/a on CPU (no peak FLOPS to measure against)"
            record.msg = msg
        return True


def install(cpu: bool) -> None:
    logging.getLogger().addFilter(_LogText(cpu))
    # torchdata's own call of a deprecated torch API; nothing a user can act on.
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
