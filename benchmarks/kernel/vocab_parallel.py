"""Kernel benchmark, vocab-parallel mode (``torchrun --nproc_per_node 2 kernel/bench.py
--vocab-parallel``): W sharded by vocabulary rows over the ranks against one GPU with the full
W at the same N; the parallel loss and gradients are checked against the single-GPU op's.
"""
from __future__ import annotations

import os

import torch

from benchmarks.bench_common import cell
from benchmarks.kernel.common import Dev, Inputs, NotAvailable, log, make_inputs, parse_shapes, rel_err, run_one, shape_label
from benchmarks.kernel.impls import build_impl


def main(args) -> None:
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    dev = Dev(device)
    if rank != 0:
        args.no_append = True
    dtype = getattr(torch, args.dtype)
    # every rank must run the same number of iterations (the op has collectives inside)
    args.max_time_per_impl = float("inf")
    shapes = parse_shapes(args.vp_shapes if not args.quick else "256x64x1000")
    rows = []

    def say(*a):
        if rank == 0:
            log(*a)

    for shape in shapes:
        N, D, V = shape
        if V % world:
            say(f"skip {shape}: V not divisible by world {world}")
            continue
        Vl = V // world
        say(f"\n=== vocab-parallel N={N} D={D} V={V}, world={world}, V_local={Vl} ===")
        # 1) single-GPU with the full W (all ranks run it on their own GPU; rank 0 reports)
        inp = make_inputs(N, D, V, dtype, device, seed=args.seed, logit_std=args.logit_std)
        try:
            fn = build_impl("fused", args, dev)
        except NotAvailable as e:
            say(f"fused op not available: {e}")
            rows.append((shape, "single GPU, full W", None, None, str(e), None, None, (None, None, None)))
            inp = None  # freed before the next shape's inputs
            dist.barrier()
            continue
        dist.barrier()
        r1 = run_one("fused", fn, inp, dev, args)
        # the single-GPU op's loss and grads: reference for the parallel correctness check
        inp.h.grad = inp.W.grad = None
        loss_single = fn(inp.h, inp.W, inp.y)
        loss_single.backward()
        dh_single = inp.h.grad.detach().float()
        dW_single = inp.W.grad.detach()[rank * Vl : (rank + 1) * Vl].float()
        loss_single = loss_single.detach().double()
        W_local = inp.W.detach()[rank * Vl : (rank + 1) * Vl].clone().requires_grad_(True)
        h_local = inp.h.detach().clone().requires_grad_(True)
        y = inp.y
        del inp
        dev.cleanup()
        # 2) vocab-parallel
        pg = dist.group.WORLD
        fnp = build_impl("fused", args, dev, process_group=pg, vocab_start=rank * Vl, vocab_size=V)
        pinp = Inputs(h_local, W_local, y)
        dist.barrier()
        r2 = run_one("fused", fnp, pinp, dev, args)

        def allreduce_dh(h, W):
            dist.all_reduce(h.grad)

        dist.barrier()
        r3 = run_one("fused", fnp, pinp, dev, args, post=allreduce_dh)
        # correctness of the parallel result vs the single-GPU op
        errs = (None, None, None)
        try:
            pinp.h.grad = pinp.W.grad = None
            lp = fnp(pinp.h, pinp.W, y)
            lp.backward()
            dh = pinp.h.grad.detach().clone()
            dist.all_reduce(dh)
            errs = (
                abs(float(lp.detach().double().item()) - float(loss_single.item())) / max(abs(float(loss_single.item())), 1e-30),
                rel_err(dh, dh_single),
                rel_err(pinp.W.grad, dW_single),
            )
        except Exception as e:
            say(f"  parallel correctness check failed: {type(e).__name__}: {e}")
        pinp.h.grad = pinp.W.grad = None
        # times: max over ranks
        for tag, r in (("single GPU, full W", r1), (f"TP={world} op only", r2), (f"TP={world} op + all_reduce(dh)", r3)):
            t = torch.tensor([r.ms if r.ms is not None else float("nan")], device=device, dtype=torch.float64)
            tmax = t.clone()
            dist.all_reduce(tmax, op=dist.ReduceOp.MAX)
            pk = torch.tensor([r.peak_gib if r.peak_gib is not None else float("nan")], device=device, dtype=torch.float64)
            dist.all_reduce(pk, op=dist.ReduceOp.MAX)
            if tag.startswith("single"):
                rows.append((shape, tag, r.ms, r.ms, r.status, r.peak_gib, None, (None, None, None)))
            else:
                rows.append((shape, tag, r.ms, float(tmax.item()), r.status, float(pk.item()), None, errs))
        single_ms = r1.ms
        for i in range(len(rows)):
            s, tag, ms0, msmax, st, pk, _, e = rows[i]
            if s == shape and single_ms and msmax:
                rows[i] = (s, tag, ms0, msmax, st, pk, msmax / single_ms, e)
        say(f"  single {cell(r1.ms, '.2f')} ms | TP op {cell(r2.ms, '.2f')} ms (rank0) | TP op+allreduce {cell(r3.ms, '.2f')} ms | errs {errs}")
        del pinp, h_local, W_local, fn, fnp, dh_single, dW_single
        dev.cleanup()
        dist.barrier()
    hdr = ("| shape (N, D, V) | run | ms rank0 | ms max over ranks | x single GPU (goal <= 0.6) "
           "| peak GiB (max rank) | loss rel err vs single | dh rel err | dW_local rel err | status |")
    lines = [hdr, "|" + "---|" * 10]
    for s, tag, ms0, msmax, st, pk, ratio, e in rows:
        lines.append(
            f"| {shape_label(s)} | {tag} | {cell(ms0, '.2f')} | {cell(msmax, '.2f')} | {cell(ratio, '.3f')} | {cell(pk, '.2f')} "
            f"| {cell(e[0], '.1e')} | {cell(e[1], '.1e')} | {cell(e[2], '.1e')} | {st} |"
        )
    table = "\n".join(lines)
    if rank == 0:
        dev.emit(args, f"Vocab-parallel fused CE, world={world}", table,
                 ("- per-rank W = V/world rows; process_group=WORLD; times are fwd+bwd medians (CUDA events).",
                  "- 'x single GPU' = max-over-ranks time / single-GPU (full W, same N) time on rank 0."))
    dist.barrier()
    dist.destroy_process_group()
