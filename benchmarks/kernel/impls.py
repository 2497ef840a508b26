"""The implementations the kernel benchmark times, by name: ``build_impl(name, args, dev)``
returns fn(h, W, y) -> loss (autograd) or, for 'floor', fn(h, W, y) -> None doing the GEMMs
alone. One that cannot run here raises NotAvailable (a table cell, not a crash).
"""
from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

from benchmarks.kernel.common import IGNORE, Dev, NotAvailable

ANCHOR_IMPLS = ("eager", "compile", "liger", "cce")
ALL_IMPLS = ("fused", "fused_fp32stats", "fused_bf16dw", "fused_checked", "fused_lean", "eager", "compile",
             "liger", "cce", "floor")


def _eager_sum(h, W, y):
    return F.cross_entropy((h @ W.T).float(), y, reduction="sum", ignore_index=IGNORE)


def _eager_mean(h, W, y):
    return F.cross_entropy((h @ W.T).float(), y, reduction="mean", ignore_index=IGNORE)


EAGER = {"sum": _eager_sum, "mean": _eager_mean}


def eager_fn(reduction: str = "sum"):
    """F.cross_entropy((h @ W.T).float(), y) reduced by `reduction` (the accuracy anchor)."""
    return EAGER[reduction]


@functools.cache
def _compiled_fn(reduction: str = "sum"):
    import torch._dynamo as dynamo

    for k in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo.config, k):
            setattr(dynamo.config, k, max(getattr(dynamo.config, k), 256))
    return torch.compile(EAGER[reduction], dynamic=False)


def _fused_entry():
    try:
        from fused_loss import fused_linear_cross_entropy
    except Exception as e:  # module not there or broken
        raise NotAvailable(f"n/a ({type(e).__name__}: {str(e)[:60]})")
    return fused_linear_cross_entropy


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
    # fused_fp32stats: statistics and gradient rows from the fp32 product (the epilogue path)
    if name in ("fused", "fused_fp32stats", "fused_bf16dw", "fused_checked", "fused_lean"):
        fused_linear_cross_entropy = _fused_entry()
        backend = args.backend
        kw = dict(reduction=args.reduction, backend=backend, ignore_index=IGNORE,
                  weight_grad_fp32=name not in ("fused_bf16dw", "fused_lean"),
                  check_labels=name == "fused_checked", fp32_statistics=name == "fused_fp32stats")
        if args.chunk_budget_mib:
            kw["chunk_budget_bytes"] = args.chunk_budget_mib << 20
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
        return eager_fn(args.reduction)
    if name == "compile":
        if not dev.cuda and not args.allow_cpu_compile:
            raise NotAvailable("n/a (CPU; --allow-cpu-compile)")
        return _compiled_fn(args.reduction)
    if name == "liger":
        loss_cls = _cuda_import(dev, "liger_kernel.transformers.fused_linear_cross_entropy",
                                "LigerFusedLinearCrossEntropyLoss")
        mod = loss_cls(reduction=args.reduction, ignore_index=IGNORE)
        return lambda h, W, y: mod(W, h, y)  # Liger takes the weight first
    if name == "cce":
        cce = _cuda_import(dev, "cut_cross_entropy", "linear_cross_entropy")
        return lambda h, W, y: cce(h, W, y, ignore_index=IGNORE, reduction=args.reduction)
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


# --------------------------------------------------------------------------------------
# the fused op with each option on, one at a time (kernel/bench.py --options)
# --------------------------------------------------------------------------------------
# name -> what is passed (the table's "arguments" cell); "plain" passes no option argument at all,
# "all-off" passes every option explicitly at its off value: equal times prove the off path free.
OPTION_VARIANTS = {
    "plain": "no option arguments",
    "all-off": "bias=None, class_weight=None, shift=False, return_aux=False, token_stats=False, "
               "logit_softcap=None, label_smoothing=0.0, z_loss=0.0, weight_grad_fp32=True",
    "bias": "bias [V] (16-bit, with its gradient)",
    "class_weight": "class_weight [V] fp32 in [0.5, 1.5)",
    "shift": "shift=True, hidden [B, N/B, D], B=2",
    "token_stats": "return_aux=True, token_stats=True",
    "logit_softcap": "logit_softcap=30",
    "label_smoothing": "label_smoothing=0.1",
    "z_loss": "z_loss=1e-4",
    "lean": "weight_grad_fp32=False (16-bit dW carry)",
}
ALL_OFF = dict(bias=None, class_weight=None, shift=False, return_aux=False, token_stats=False,
               logit_softcap=None, label_smoothing=0.0, z_loss=0.0, weight_grad_fp32=True)


def build_option_impl(name: str, args, dev: Dev, shape):
    """fn(h, W, y) -> loss: the fused op with option `name` of OPTION_VARIANTS on (the others at
    their defaults); the same non-option arguments (reduction, backend, check_labels=False) in all."""
    flce = _fused_entry()
    N, D, V = shape
    base = dict(reduction=args.reduction, backend=args.backend, ignore_index=IGNORE, check_labels=False)
    if args.chunk_size:
        base["chunk_size"] = args.chunk_size
    g = torch.Generator(device=dev.device)
    g.manual_seed(args.seed + 1)
    dtype = getattr(torch, args.dtype)
    if name == "plain":
        return lambda h, W, y: flce(h, W, y, **base)
    if name == "all-off":
        kw = {**base, **ALL_OFF}
        return lambda h, W, y: flce(h, W, y, **kw)
    if name == "bias":
        bias = (torch.randn(V, generator=g, device=dev.device) * 0.02).to(dtype).requires_grad_(True)

        def with_bias(h, W, y):
            bias.grad = None
            return flce(h, W, y, bias=bias, **base)

        return with_bias
    if name == "class_weight":
        cw = 0.5 + torch.rand(V, generator=g, device=dev.device)
        return lambda h, W, y: flce(h, W, y, class_weight=cw, **base)
    if name == "shift":
        B = 2 if N % 2 == 0 else 1
        return lambda h, W, y: flce(h.view(B, N // B, D), W, y.view(B, N // B), shift=True, **base)
    if name == "token_stats":
        return lambda h, W, y: flce(h, W, y, return_aux=True, token_stats=True, **base)[0]
    if name == "logit_softcap":
        return lambda h, W, y: flce(h, W, y, logit_softcap=30.0, **base)
    if name == "label_smoothing":
        return lambda h, W, y: flce(h, W, y, label_smoothing=0.1, **base)
    if name == "z_loss":
        return lambda h, W, y: flce(h, W, y, z_loss=1e-4, **base)
    if name == "lean":
        return lambda h, W, y: flce(h, W, y, weight_grad_fp32=False, **base)
    raise ValueError(f"unknown option variant {name}")
