"""AdamW (Loshchilov & Hutter 2019) for the training loop: torch's fused kernel, layout-aware.

torch's single-tensor AdamW (its default on the CPU) runs each update as seven elementwise
passes, two of them allocating a weight-sized temporary; its fused kernel does one pass. On the
project's 2-core CPU an SD 1.5-shaped U-Net's step took 1.2-1.9 s the first way and 0.36-0.57 s
the second (``scripts/bench_models.py``). But the fused CPU kernel copies every tensor that is not
contiguous to a contiguous one and back, and ldm's U-Net keeps its conv weights channels_last
(``ldm.models.unet``): a 1280 x 2560 x 3 x 3 weight's update took 0.32 s instead of 0.07 s. The
update is elementwise, so any memory order does as long as the parameter, its gradient and both
moments share it: ``AdamW`` hands the kernel such tensors as flat views of their storage.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def fused_ok(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused AdamW takes these: floating-point tensors on the CPU or CUDA."""
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )


def _dense_flat(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
    """1-D views of same-shaped channels_last tensors with equal strides, else None."""
    first = tensors[0]
    if first.dim() != 4 or not first.is_contiguous(memory_format=torch.channels_last):
        return None
    if any(t.stride() != first.stride() or t.shape != first.shape for t in tensors):
        return None
    return tuple(t.as_strided((t.numel(),), (1,), t.storage_offset()) for t in tensors)


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with ``fused=True`` where torch has the kernel (see the module note).

    Same state and state_dict as torch's, so checkpoints move between the two.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict], **kwargs) -> None:
        params = list(params)  # tensors, or param groups (dicts with "params")
        tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
        super().__init__(params, fused=fused_ok(tensors), **kwargs)

    def _init_group(
        self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
    ):
        """torch's gathering of a group's tensors, then the channels_last ones as flat views."""
        out = super()._init_group(
            group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
        )
        if group["fused"] and not group["amsgrad"]:
            for i in range(len(params)):
                flat = _dense_flat((params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]))
                if flat is not None:
                    params[i], grads[i], exp_avgs[i], exp_avg_sqs[i] = flat
        return out
