"""The one fp64 reference of the fused loss and the one relative error, for the tests and the
kernel benchmark alike: materialize the logits in float64 (in row chunks) and take torch's
cross-entropy and its autograd gradients; errors are relative L2 norms against it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Reference:
    """Loss and gradients in float64 (reference_loss); unpacks as (loss, dh, dW) or, with a
    bias, (loss, dh, dW, db). target_prob and entropy are the mean softmax probability of the
    label and the mean softmax entropy (nats) over the valid rows."""

    loss: torch.Tensor  # fp64: a scalar reduced as asked, or per token for reduction="none"
    dh: torch.Tensor  # fp64, hidden's shape
    dW: torch.Tensor  # fp64 [V, D]
    db: torch.Tensor | None = None  # fp64 [V], with a bias
    target_prob: float = float("nan")
    entropy: float = float("nan")
    seconds: float = 0.0

    def _parts(self):
        return (self.loss, self.dh, self.dW) + (() if self.db is None else (self.db,))

    def __iter__(self):
        return iter(self._parts())

    def __getitem__(self, i):
        return self._parts()[i]

    def __len__(self):
        return len(self._parts())

    def describe(self) -> str:
        return f"mean target prob {self.target_prob:.3f}, entropy {self.entropy:.2f} nats"


def reference_loss(hidden, weight, labels, *, ignore_index=-100, reduction="sum",
                   label_smoothing=0.0, z_loss=0.0, logit_softcap=None, upstream=None,
                   bias=None, class_weight=None, chunk=None) -> Reference:
    """Loss, dh, dW (and db with a bias) of cross_entropy(hidden @ weight.T + bias) in float64,
    with the loss options of fused_loss (z-loss weighted like the token's cross-entropy).

    The inputs are upcast exactly from their stored values; no TF32 anywhere (the fp32 matmul
    flags are set to "highest" too). `chunk` rows of logits at a time (all rows when None): the
    transient stays ~4 * chunk * V * 8 bytes beside W and dW in fp64. `upstream` weights the
    per-token losses for reduction="none" (the gradient of sum(loss * upstream)) and scales the
    scalar loss's gradient otherwise. reduction "mean" divides by the number of valid labels,
    or by the summed class weights of the valid labels, as F.cross_entropy."""
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reference reduction must be sum, mean or none, got {reduction!r}")
    t0 = time.perf_counter()
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    old_cudnn = torch.backends.cudnn.allow_tf32
    old_prec = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        return _reference(hidden, weight, labels, ignore_index, reduction, label_smoothing, z_loss,
                          logit_softcap, upstream, bias, class_weight, chunk, t0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
        torch.backends.cudnn.allow_tf32 = old_cudnn
        torch.set_float32_matmul_precision(old_prec)


def _reference(hidden, weight, labels, ignore_index, reduction, label_smoothing, z_loss,
               logit_softcap, upstream, bias, class_weight, chunk, t0) -> Reference:
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    w = weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    cw = None if class_weight is None else class_weight.detach().double()
    valid = y != ignore_index
    token_weight = valid.double() if cw is None else torch.where(valid, cw[y.clamp(min=0)], 0.0)
    if reduction == "mean" and cw is not None:  # torch: divided by the summed weights
        total = token_weight.sum()
        norm = total if total != 0 else torch.ones_like(total)
    else:
        norm = valid.sum().clamp(min=1).double()
    up = None if upstream is None else upstream.detach().double()
    if up is not None and reduction == "none":
        up = up.reshape(-1)

    n = h.shape[0]
    step = n if not chunk else chunk
    dh = torch.empty(h.shape, dtype=torch.float64, device=h.device)
    dw = torch.zeros_like(w)
    db = None if b is None else torch.zeros_like(b)
    per_token_all = []
    p_sum = torch.zeros((), dtype=torch.float64, device=h.device)
    ent_sum = torch.zeros((), dtype=torch.float64, device=h.device)
    for s in range(0, max(n, 1), max(step, 1)):
        hc = h[s:s + step].double().requires_grad_()
        yc, vc, twc = y[s:s + step], valid[s:s + step], token_weight[s:s + step]
        z = hc @ w.t()
        if b is not None:
            z = z + b
        if logit_softcap:
            z = logit_softcap * torch.tanh(z / logit_softcap)
        with torch.no_grad():  # the softmax statistics, over the valid rows
            logp = torch.log_softmax(z.detach(), dim=1)
            rows = torch.arange(logp.shape[0], device=h.device)
            p_sum += torch.where(vc, logp[rows, yc.clamp(min=0)].exp(), 0.0).sum()
            ent = -(logp.exp().unsqueeze(1) @ logp.unsqueeze(2)).view(-1)  # -sum p log p
            ent_sum += torch.where(vc, ent, 0.0).sum()
            del logp
        per_token = F.cross_entropy(z, yc, reduction="none", ignore_index=ignore_index,
                                    label_smoothing=label_smoothing, weight=cw)
        if z_loss:
            per_token = per_token + z_loss * torch.logsumexp(z, dim=1) ** 2 * twc
        del z
        if reduction == "none":
            part = per_token
            out = (part * up[s:s + step]).sum() if up is not None else part.sum()
        else:
            part = per_token.sum() if reduction == "sum" else per_token.sum() / norm
            out = part * up if up is not None else part
        per_token_all.append(part.detach())
        grads = torch.autograd.grad(out, [hc, w] + ([] if b is None else [b]))
        dh[s:s + step] = grads[0]
        dw += grads[1]
        if b is not None:
            db += grads[2]
    if reduction == "none":
        loss = torch.cat(per_token_all).reshape(labels.shape)
    else:
        loss = torch.stack(per_token_all).sum()
    n_valid = valid.sum().clamp(min=1).double()
    return Reference(loss, dh.reshape(hidden.shape), dw, db, float(p_sum / n_valid),
                     float(ent_sum / n_valid), time.perf_counter() - t0)


@torch.no_grad()
def rel_err(got, want, chunk_rows=8192) -> float:
    """|got - want| / |want| (L2 norms, in float64 on want's device, `chunk_rows` rows of dim 0
    at a time); |got - want| when want is zero, nan when got is None."""
    if got is None:
        return float("nan")
    want = want.detach()
    got = got.detach().to(want.device)
    if want.dim() == 0 or got.dim() == 0:
        num = ((got.double() - want.double()) ** 2).sum()
        den = (want.double() ** 2).sum()
    else:
        num = torch.zeros((), dtype=torch.float64, device=want.device)
        den = torch.zeros((), dtype=torch.float64, device=want.device)
        for s in range(0, want.shape[0], chunk_rows):
            r = want[s:s + chunk_rows].double()
            num += ((got[s:s + chunk_rows].double() - r) ** 2).sum()
            den += (r ** 2).sum()
    num, den = float(num.sqrt()), float(den.sqrt())
    return num / den if den > 0 else num
