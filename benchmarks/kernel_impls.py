"""The implementations the kernel benchmark times, by name: ``build_impl(name, args, dev)``
returns fn(h, W, y) -> loss (autograd) or, for 'floor', fn(h, W, y) -> None doing the GEMMs
alone. One that cannot run here raises NotAvailable (a table cell, not a crash).
"""
from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

from kernel_common import IGNORE, Dev, NotAvailable

ANCHOR_IMPLS = ("eager", "compile", "liger", "cce")
ALL_IMPLS = ("fused", "fused_bf16dw", "fused_checked", "fused_lean", "eager", "compile", "liger", "cce", "floor")


def _eager_fn(h, W, y):
    return F.cross_entropy((h @ W.T).float(), y, reduction="sum", ignore_index=IGNORE)


@functools.cache
def _compiled_fn():
    import torch._dynamo as dynamo

    for k in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo.config, k):
            setattr(dynamo.config, k, max(getattr(dynamo.config, k), 256))
    return torch.compile(_eager_fn, dynamic=False)


def _cuda_import(dev: Dev, module: str, attr: str):
    """An anchor library's entry point; NotAvailable (a table cell, not a crash) off CUDA or when
    the library is missing."""
    if not dev.cuda:
        raise NotAvailable("n/a (needs CUDA)")
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as e:
        raise NotAvailable(f"n/a ({type(e).__name__})")


def build_impl(name: str, args, dev: Dev, process_group=None, vocab_start=0, vocab_size=None):
    """fn(h, W, y) -> loss (autograd) or, for 'floor', fn(h, W, y) -> None doing GEMMs."""
    # fused_bf16dw: dW carried in bf16 across chunks; fused_checked: the op checks the label
    # range itself (one host sync); the trainer checks the CPU batch and passes False, as here
    # fused_lean: both memory knobs down (bf16 dW carry, half the default logits budget)
    if name in ("fused", "fused_bf16dw", "fused_checked", "fused_lean"):
        try:
            from fused_loss import fused_linear_cross_entropy
        except Exception as e:  # module not there or broken
            raise NotAvailable(f"n/a ({type(e).__name__}: {str(e)[:60]})")
        backend = args.backend
        kw = dict(reduction="sum", backend=backend, ignore_index=IGNORE,
                  weight_grad_fp32=name not in ("fused_bf16dw", "fused_lean"),
                  check_labels=name == "fused_checked")
        if name == "fused_lean":
            kw["chunk_budget_bytes"] = 512 << 20
        if args.chunk_size:
            kw["chunk_size"] = args.chunk_size
        if process_group is not None:
            kw.update(process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size)

        def fused(h, W, y):
            return fused_linear_cross_entropy(h, W, y, **kw)

        return fused
    if name == "eager":
        return _eager_fn
    if name == "compile":
        if not dev.cuda and not args.allow_cpu_compile:
            raise NotAvailable("n/a (CPU; --allow-cpu-compile)")
        return _compiled_fn()
    if name == "liger":
        loss_cls = _cuda_import(dev, "liger_kernel.transformers.fused_linear_cross_entropy",
                                "LigerFusedLinearCrossEntropyLoss")
        mod = loss_cls(reduction="sum", ignore_index=IGNORE)
        return lambda h, W, y: mod(W, h, y)  # Liger takes the weight first
    if name == "cce":
        cce = _cuda_import(dev, "cut_cross_entropy", "linear_cross_entropy")
        return lambda h, W, y: cce(h, W, y, ignore_index=IGNORE, reduction="sum")
    if name == "floor":
        C = args.floor_chunk
        state = {}

        @torch.no_grad()
        def floor(h, W, y):
            N, D = h.shape
            V = W.shape[0]
            c0 = min(C, N)
            z = state.get("z")
            if z is None or z.shape != (c0, V) or z.dtype != h.dtype:
                z = state["z"] = torch.empty(c0, V, dtype=h.dtype, device=h.device)
            dh = torch.empty_like(h)
            dW = torch.empty_like(W)
            Wt = W.t()
            for i, s in enumerate(range(0, N, C)):
                hc = h[s : s + C]
                zc = z[: hc.shape[0]]
                torch.mm(hc, Wt, out=zc)
                torch.mm(zc, W, out=dh[s : s + C])
                if i == 0:
                    torch.mm(zc.t(), hc, out=dW)
                else:
                    dW.addmm_(zc.t(), hc)
            # hand the results over like autograd would
            h.grad, W.grad = dh, dW
            return None

        floor.release = lambda: state.clear()
        return floor
    raise ValueError(f"unknown impl {name}")
