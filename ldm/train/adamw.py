"""AdamW (Loshchilov & Hutter 2019) for the training loop: torch's fused kernel, layout-aware.

torch's single-tensor AdamW (its default on the CPU) runs each update as seven elementwise
passes, two of them allocating a weight-sized temporary; its fused kernel does one pass. On the
project's 2-core CPU an SD 1.5-shaped U-Net's optimizer step alone took 1.2-1.9 s the first way
and 0.36-0.57 s the second (docs/benchmarks.md). Two things in the fused CPU kernel (torch 2.14)
need care, both about memory layout:
- it is slow on tensors that are not contiguous: ldm's U-Net keeps its conv weights
  channels_last (``ldm.accel.cpu``), and a 1280 x 2560 x 3 x 3 weight's update took 0.32 s
  instead of 0.07 s. The update is elementwise, so any memory order does as long as parameter,
  gradient and moments share it: ``AdamW`` hands the kernel such tensors as flat views;
- it computes wrong values when a gradient or moment is laid out differently from its parameter
  (a transposed gradient: off by 0.06 after three steps at lr 1e-2). Autograd's gradients follow
  the parameter's layout, but a gradient set by hand or a moment restored from a checkpoint need
  not, so ``AdamW`` gives those the parameter's layout first.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def fused_ok(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these: floating-point tensors on the CPU or CUDA."""
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides, ignoring dimensions of size 1 (which never step)."""
    return a.shape == b.shape and all(
        sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape, strict=True) if n > 1
    )


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a tensor whose elements fill its storage span without gaps."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _listed(params: Iterable) -> list:
    """Tensors, (name, tensor) pairs or param groups, with every iterator made a list."""
    params = list(params)
    return [dict(p, params=list(p["params"])) if isinstance(p, dict) else p for p in params]


def _tensors(groups: list) -> list[torch.Tensor]:
    items = [t for g in groups for t in (g["params"] if isinstance(g, dict) else [g])]
    return [t[1] if isinstance(t, tuple) else t for t in items]


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW``, fused where torch has the kernel (see the module note).

    Same state and state_dict as torch's, so checkpoints move between the two; ``fused`` and
    ``foreach`` may still be given to choose torch's other implementations.
    """

    def __init__(self, params: Iterable, **kwargs) -> None:
        groups = _listed(params)
        if not kwargs.get("foreach"):
            kwargs.setdefault("fused", fused_ok(_tensors(groups)))
        super().__init__(groups, **kwargs)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a checkpoint of torch's AdamW carries fused=None
            group["fused"], group["foreach"] = self.defaults["fused"], self.defaults["foreach"]

    def _init_group(
        self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
    ):
        """torch's gathering of a group's tensors, then each made the parameter's layout and,
        where that is channels_last, passed as flat views."""
        out = super()._init_group(
            group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
        )
        if not group["fused"]:
            return out
        lists = (
            (exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
            if group["amsgrad"]
            else (exp_avgs, exp_avg_sqs)
        )
        for i, p in enumerate(params):
            if not _same_layout(grads[i], p):  # a temporary copy; .grad is left as it was
                grads[i] = torch.empty_like(p).copy_(grads[i])
            for key, tensors in zip(MOMENTS, lists, strict=False):
                if not _same_layout(tensors[i], p):  # kept: the state takes p's layout
                    self.state[p][key] = tensors[i] = torch.empty_like(p).copy_(tensors[i])
            if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last):
                params[i], grads[i] = _flat(p), _flat(grads[i])
                for tensors in lists:
                    tensors[i] = _flat(tensors[i])
        return out
