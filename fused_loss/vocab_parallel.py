"""Vocabulary parallelism: each rank of a group holds a contiguous slice of the vocabulary.

Per chunk the ranks exchange ONE small tensor, the [C, 4] row statistics (never anything of
size V), and every rank then knows the full log-sum-exp, target logit and logit sum.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist


def resolve_group(group_name: str):
    """The process group behind a name (the custom op carries names, not group objects)."""
    return dist.distributed_c10d._resolve_process_group(group_name)


def combine_stats(stats: torch.Tensor, group) -> torch.Tensor:
    """All-gather the [C, 4] (max, sum-exp, target, logit-sum) rows and merge them."""
    world = dist.get_world_size(group)
    gathered = torch.empty((world, *stats.shape), dtype=stats.dtype, device=stats.device)
    dist.all_gather_into_tensor(gathered, stats.contiguous(), group=group)
    row_max = gathered[:, :, 0].amax(dim=0)
    sum_exp = (gathered[:, :, 1] * torch.exp(gathered[:, :, 0] - row_max)).sum(dim=0)
    rest = gathered[:, :, 2:].sum(dim=0)
    return torch.cat([row_max[:, None], sum_exp[:, None], rest], dim=1)


@functools.lru_cache(maxsize=64)
def check_tiling(group_name: str, vocab_start: int, v_local: int, vocab_size: int) -> None:
    """Once per layout: the ranks' slices must tile [0, vocab_size) exactly.

    This is the only host round trip of the op, and it runs on the first call for a given
    (group, slice) only; later calls hit the cache.
    """
    group = resolve_group(group_name)
    slices: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(slices, (vocab_start, v_local, vocab_size), group=group)
    sizes = {s[2] for s in slices}
    if len(sizes) != 1:
        raise ValueError(f"vocab_size differs across the ranks of the group: {sorted(sizes)}")
    covered = 0
    for start, length, _ in sorted(slices):
        if start != covered or length < 1:
            raise ValueError(
                f"weight slices (vocab_start, V_local) {sorted(s[:2] for s in slices)} do not "
                f"tile the vocabulary [0, {vocab_size}): gap or overlap at {covered}")
        covered = start + length
    if covered != vocab_size:
        raise ValueError(f"weight slices cover [0, {covered}) but vocab_size is {vocab_size}")
