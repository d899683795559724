"""Attention for bf16 inference on the CPU: softmax(QK^T / sqrt(d)) V (Vaswani et al. 2017) as
oneDNN products, one head at a time.

torch's CPU flash kernel runs bf16 attention far below the GEMMs' rate. Here the logits come
from oneDNN's fp32 inner product (never rounded to bf16), the softmax runs in fp32 over one
head's (L, S) scores, still in cache, and PV is a bf16 product with fp32 accumulation: the
flash kernel's arithmetic, in a different order. Inference without a mask only; anything else
is ``F.scaled_dot_product_attention``. ``ldm.accel.cpu`` installs ``sdpa`` as the ``sdpa`` of
the attention modules that have one. Measurements: docs/benchmarks.md ("CPU attention").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.accel.matmul import ONEDNN_MATMUL, inner_product


def routed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``sdpa`` computes this call itself: bf16 (B, heads, L, d) on the CPU, no
    autograd, no autocast."""
    return (
        ONEDNN_MATMUL is not None
        and q.dim() == 4
        and all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in (q, k, v))
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
        and not torch.is_autocast_enabled("cpu")
    )


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v)`` for q (B, heads, L, d), k and v (B, heads, S,
    d): (B, heads, L, d), laid out (B, L, heads, d) in memory as the flash kernel's output is, so
    that the caller's transpose + flatten is a view."""
    if not routed(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)
    b, heads, n, d = q.shape
    dense = dict(dtype=torch.float32, memory_format=torch.contiguous_format)  # one copy each
    q32 = q.to(**dense).mul_(d**-0.5)  # small next to the scores: (B, heads, L, d)
    k32 = k.to(**dense)
    vt = v.transpose(-1, -2).contiguous()  # (B, heads, d, S): PV as an inner product with V^T
    out = q.new_empty(b, n, heads, d)
    for i in range(b):
        for h in range(heads):
            scores = inner_product(q32[i, h], k32[i, h])  # (L, S) fp32
            probs = torch.softmax(scores, dim=-1).to(v.dtype)
            out[i, :, h] = inner_product(probs, vt[i, h])  # (L, d)
    return out.transpose(1, 2)
