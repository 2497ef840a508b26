"""Benchmark-only launch module: the training job under a GPU memory cap.

    TRAIN_FILE=benchmarks.e2e.memory_cap MEMORY_CAP_GIB=80 ./run_train.sh [arguments...]

run_train.sh starts ``python -m $TRAIN_FILE`` in every rank. This module caps the process's CUDA
caching allocator at MEMORY_CAP_GIB on its device (LOCAL_RANK) with
``torch.cuda.set_per_process_memory_fraction`` before anything is allocated, then runs
MEMORY_CAP_TRAIN_FILE (default ``parallel.train``) as ``__main__`` with the same arguments. An
allocation beyond the cap raises ``torch.OutOfMemoryError`` as a card of that size would, so
"fits in 80 GiB" is measured on a larger card, not estimated. Nothing in the product imports it.
"""

from __future__ import annotations

import os
import runpy

GIB = 2**30


def apply_cap(cap_gib: float, device: int) -> float | None:
    """Cap ``device`` at ``cap_gib``; returns the fraction set (None: no CUDA, nothing capped)."""
    import torch

    if not torch.cuda.is_available():
        print(f"memory_cap: no CUDA device; the cap of {cap_gib:g} GiB is not applied", flush=True)
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, cap_gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    print(f"memory_cap: cuda:{device} capped at {cap_gib:g} GiB of {total / GIB:.1f} GiB "
          f"(set_per_process_memory_fraction {fraction:.4f})", flush=True)
    return fraction


def main() -> None:
    cap = os.environ.get("MEMORY_CAP_GIB")
    if cap:
        apply_cap(float(cap), int(os.environ.get("LOCAL_RANK", "0")))
    runpy.run_module(os.environ.get("MEMORY_CAP_TRAIN_FILE", "parallel.train"), run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
