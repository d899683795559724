"""A LoRA from two models' difference: the best rank-r approximation of each weight's change.

For every linear and convolution weight (2-D, or 4-D flattened to (out, in·kh·kw)) that differs
between ``base`` and ``tuned``, the truncated SVD ΔW ≈ U_r diag(S_r) V_r^T is the closest rank-r
matrix in Frobenius norm (Eckart-Young), so up = U_r diag(S_r), down = V_r^T (a kxk convolution
of r channels followed by a 1x1 one, as LoRA's convolution pairs). This is what kohya's
``extract_lora_from_models`` does for a fine-tune; ldm uses it to ship a full distilled student
as a LoRA on its teacher. Biases and norm weights cannot live in a LoRA and keep the base's: the
report says how much of the change (squared Frobenius norm) that leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.formats.lora import LoraModule


@dataclass
class ExtractReport:
    """Shares of the total squared change ||tuned - base||^2 over all tensors."""

    layers: int  # pairs written
    kept: float  # held by the rank-r pairs
    truncated: float  # lost to the rank cut
    not_lora: float  # in biases, norms and other tensors a LoRA cannot hold


@torch.no_grad()
def extract_lora(
    base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], rank: int, part: str = "unet"
) -> tuple[list[LoraModule], ExtractReport]:
    """Rank-``rank`` pairs for the module weights of ``part`` that changed from ``base`` to
    ``tuned`` (two state dicts with the same keys and shapes), alpha = rank (scale 1)."""
    if rank < 1:
        raise ValueError(f"extract_lora: rank must be >= 1, got {rank}")
    if base.keys() != tuned.keys():
        raise ValueError("extract_lora: the two state dicts have different keys")
    modules, kept, cut, other = [], 0.0, 0.0, 0.0
    for key, new in tuned.items():
        delta = new.float() - base[key].float()
        energy = float(delta.square().sum())
        if energy == 0.0:
            continue
        if not (key.endswith(".weight") and delta.dim() in (2, 4)):  # biases, norms: 1-D
            other += energy
            continue
        u, s, vh = torch.linalg.svd(delta.flatten(1).double(), full_matrices=False)
        r = min(rank, s.numel())
        kept += float(s[:r].square().sum())
        cut += float(s[r:].square().sum())
        up, down = (u[:, :r] * s[:r]).float(), vh[:r].float()
        if delta.dim() == 4:  # kxk convolution down to r channels, then 1x1 up
            down, up = down.reshape(r, *delta.shape[1:]), up[:, :, None, None]
        name = key.removesuffix(".weight")
        modules.append(LoraModule(part, name, down.contiguous(), up.contiguous(), float(r)))
    total = kept + cut + other
    shares = [x / total if total else 0.0 for x in (kept, cut, other)]
    return modules, ExtractReport(len(modules), *shares)
