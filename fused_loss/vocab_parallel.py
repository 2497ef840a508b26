"""Vocabulary parallelism: each rank of a group holds a contiguous slice of the vocabulary.

Per chunk the ranks exchange ONE small tensor, the [C, 4] row statistics ([C, 6] with the
per-token entropy and argmax; never anything of size V), and every rank then knows the full
log-sum-exp, target logit and logit sum.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


# torch 2.13 renamed all_gather_into_tensor (now deprecated); the GPU image has torch 2.11
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def resolve_group(group_name: str):
    """The process group behind a name (the custom op carries names, not group objects)."""
    return dist.distributed_c10d._resolve_process_group(group_name)


def combine_stats(stats: torch.Tensor, group) -> torch.Tensor:
    """All-gather the [C, 4] (max, sum-exp, target, logit-sum) rows and merge them.

    [C, 6] rows (token_stats: the entropy's numerator and the argmax as int32 bits, see
    rows_torch.row_stats) travel in the same all-gather and are merged here too."""
    world = dist.get_world_size(group)
    gathered = torch.empty((world * stats.shape[0], stats.shape[1]), dtype=stats.dtype,
                           device=stats.device)
    _all_gather_single(gathered, stats.contiguous(), group=group)
    gathered = gathered.view(world, *stats.shape)
    row_max = gathered[:, :, 0].amax(dim=0)
    if stats.shape[1] == 4:
        sum_exp = (gathered[:, :, 1] * torch.exp(gathered[:, :, 0] - row_max)).sum(dim=0)
        rest = gathered[:, :, 2:].sum(dim=0)
        return torch.cat([row_max[:, None], sum_exp[:, None], rest], dim=1)
    shift = gathered[:, :, 0] - row_max  # <= 0: each rank's max against the row's
    scale = torch.exp(shift)
    sum_exp = (gathered[:, :, 1] * scale).sum(dim=0)
    # sum e^(y-M) (y-M) = sum_r e^(m_r-M) (T_r + (m_r-M) S_r); a rank with S_r = 0 adds 0
    moved = torch.where(scale > 0, shift * gathered[:, :, 1], 0.0)
    spread = (scale * (gathered[:, :, 4] + moved)).sum(dim=0)
    rest = gathered[:, :, 2:4].sum(dim=0)
    # the argmax: the smallest global index among the ranks that hold the row's max (torch's
    # first-of-ties over the whole vocabulary, whatever the ranks' order of slices)
    index = gathered[:, :, 5].view(torch.int32)
    at_max = gathered[:, :, 0] == row_max
    argmax = torch.where(at_max, index, torch.iinfo(torch.int32).max).amin(dim=0)
    return torch.cat([row_max[:, None], sum_exp[:, None], rest, spread[:, None],
                      argmax.view(torch.float32)[:, None]], dim=1)


_checked_layouts: dict[tuple[str, int], tuple] = {}


def check_tiling(group_name: str, vocab_start: int, v_local: int, vocab_size: int) -> None:
    """The ranks' slices must tile [0, vocab_size) exactly: checked once per (group, vocab).

    The first call gathers every rank's slice (the op's only host round trip); later calls
    compare this rank's slice with the layout remembered then, without a collective, so a
    rank whose slice changed fails alone instead of hanging its peers in a mismatched
    collective.
    """
    group = resolve_group(group_name)
    if dist.get_backend(group) == "fake":  # dry runs: collectives return this rank's own data
        return
    rank = dist.get_rank(group)
    layout = _checked_layouts.get((group_name, vocab_size))
    if layout is not None:
        if layout[rank] != (vocab_start, v_local):
            raise ValueError(
                f"this rank's weight slice (vocab_start, V_local)=({vocab_start}, {v_local}) "
                f"differs from {layout[rank]} seen on the first call for this process group "
                f"and vocab_size={vocab_size}; slices must stay fixed")
        return
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
    _checked_layouts[(group_name, vocab_size)] = tuple(s[:2] for s in slices)
