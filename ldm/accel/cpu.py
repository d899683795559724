"""``ldm-cpu``: ldm's own CPU routes, applied to a loaded plain model in place.

Swaps ``nn.Linear``/``nn.Conv2d`` for ``ldm.accel.matmul.Linear``/``ldm.accel.conv.Conv2d``
(same parameters, a different ``forward``). For the U-Net it also holds conv weights in
channels_last, so the transformers' (B, C, H, W) <-> (B, H*W, C) reshapes are free views and
oneDNN's convolutions skip layout reorders; under autograd the loss gradient is turned
channels_last as it enters the U-Net, so weight gradients keep their parameter's layout (the
fused AdamW in ``ldm/train/adamw.py`` relies on it). ``state_dict()`` still returns contiguous
tensors. For inference (not ``training``) the products' weights are then packed in oneDNN's
layout (``ldm.accel.packed``) and the transformers' attention runs as oneDNN products
(``ldm.accel.attention``). Measurements: docs/benchmarks.md.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.accel import attention
from ldm.accel.conv import Conv2d
from ldm.accel.matmul import Linear
from ldm.accel.packed import pack_linears
from ldm.models.unet import UNet2DConditionModel

_SWAPS = {nn.Linear: Linear, nn.Conv2d: Conv2d}


def apply_ldm_cpu(module: nn.Module, training: bool = False) -> None:
    """Route ``module``'s linear layers and convolutions through ldm's CPU GEMMs, in place;
    for inference, with packed weights."""
    for m in module.modules():
        routed = _SWAPS.get(type(m))  # exact type: subclasses (peft's layers) keep theirs
        if routed is not None:
            m.__class__ = routed
        if isinstance(m, UNet2DConditionModel):  # also inside a peft wrapper
            _channels_last(m)
        if not training and hasattr(type(m), "sdpa"):  # attention modules naming their kernel
            m.sdpa = attention.sdpa
    if not training:
        pack_linears(module)


def _channels_last(unet: UNet2DConditionModel) -> None:
    if getattr(unet, "_ldm_channels_last", False):  # applied twice: hooks once
        return
    unet.to(memory_format=torch.channels_last)
    unet._register_state_dict_hook(_contiguous_state_dict)
    unet.register_forward_pre_hook(_sample_channels_last, with_kwargs=True)
    unet.conv_out.register_forward_hook(_grad_channels_last)
    unet._ldm_channels_last = True


def _contiguous_state_dict(module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: channels_last weights are returned contiguous, as safetensors expects."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and not value.is_contiguous():
            state[key] = value.contiguous()


def _sample_channels_last(module: nn.Module, args: tuple, kwargs: dict):
    """The latents enter in the weights' layout, so every activation after conv_in keeps it."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    elif isinstance(kwargs.get("sample"), torch.Tensor):
        kwargs = {
            **kwargs,
            "sample": kwargs["sample"].contiguous(memory_format=torch.channels_last),
        }
    return args, kwargs


def _grad_channels_last(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
    """The loss's gradient arrives contiguous; channels_last keeps the backward convolutions in
    the weights' layout, so weight gradients need no copy (~0.3 s per SD 1.5 step)."""
    if out.requires_grad and out.is_contiguous(memory_format=torch.channels_last):
        out.register_hook(lambda grad: grad.contiguous(memory_format=torch.channels_last))
