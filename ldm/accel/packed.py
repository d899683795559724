"""Weights reordered once into oneDNN's blocked layout, for inference on the CPU.

``F.linear`` and the unpacked oneDNN inner product reorder the (N, K) weight on every call; a
weight reordered once (as inductor's freezing does) makes a product of many rows 5-9 % faster and
a one-row product (adaLN modulation) ~2x. A product followed by its activation module (the tanh
GELU of a transformer MLP) runs the activation as the product's post-op: one pass over the
output instead of two. The packed weight replaces the dense one (memory unchanged);
``state_dict()``, ``load_state_dict()`` and ``.to()`` see the dense weight. Inference only: a
product that autograd or autocast must see goes back to the dense weight. Measurements:
docs/benchmarks.md ("Packed weights").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.accel import matmul
from ldm.accel.matmul import ONEDNN_MATMUL, Linear, linear, needs_grad

# (product, activation) children fused by ``fuse_activations``: diffusers' names in FLUX's
# single-stream block and the GELU module of SD3/FLUX MLPs
FUSIBLE = (("proj_mlp", "act_mlp"), ("proj", "act"))
_POST_OPS = {"none": ("none", [], ""), "gelu_tanh": ("gelu", [], "tanh")}


def packable(weight: torch.Tensor) -> bool:
    """Whether oneDNN should own this weight: bf16 on any x86 CPU with bf16 support; fp32 where
    oneDNN is already the faster library (``matmul.PREFER_ONEDNN``)."""
    if ONEDNN_MATMUL is None or weight.device.type != "cpu" or weight.dim() != 2:
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32 and matmul.PREFER_ONEDNN


class PackedLinear(Linear):
    """``ldm.accel.matmul.Linear`` whose weight lives in oneDNN's layout while it is packed.

    ``activation``: "none" or "gelu_tanh", applied after the product (as a post-op when packed).
    """

    _packed: torch.Tensor | None = None
    activation: str = "none"

    def pack(self) -> None:
        if self._packed is not None or not packable(self.weight):
            return
        self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
        # the dense storage is released; shape and dtype stay for code that reads them
        self.weight.data = torch.full((), float("nan"), dtype=self.weight.dtype).expand(
            self.weight.shape
        )

    def unpack(self) -> None:
        if self._packed is not None:
            self.weight.data = self._packed.to_dense()
            self._packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and (
            needs_grad(x, self.bias)
            or torch.is_autocast_enabled("cpu")
            or x.dtype != self._packed.dtype
        ):
            self.unpack()  # autograd, autocast or another dtype: the dense weight from now on
        if self._packed is None:
            out = linear(x, self.weight, self.bias)
            return F.gelu(out, approximate="tanh") if self.activation == "gelu_tanh" else out
        bias = None if self.bias is None else self.bias.contiguous()
        return ONEDNN_MATMUL(x.contiguous(), self._packed, bias, *_POST_OPS[self.activation])

    def _apply(self, fn, recurse=True):  # .to(), .float(), .cuda(): the dense weight moves
        was_packed = self._packed is not None
        self.unpack()
        out = super()._apply(fn, recurse)
        if was_packed:
            self.pack()  # again, where the new device and dtype allow it
        return out

    def __getstate__(self):  # deepcopy, pickle: the opaque packed tensor has no storage to copy
        state = self.__dict__.copy()
        if self._packed is not None:  # the copy holds the dense weight (and stays unpacked)
            dense = nn.Parameter(self._packed.to_dense(), self.weight.requires_grad)
            state["_parameters"] = {**state["_parameters"], "weight": dense}
            state["_packed"] = None
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:
            destination[prefix + "weight"] = self._packed.to_dense()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        was_packed = self._packed is not None
        self.unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if was_packed:
            self.pack()


def pack_linears(module: nn.Module) -> int:
    """Pack every routed ``Linear`` of ``module`` whose weight oneDNN should own; fuse the tanh
    GELUs that follow them. Returns the number of products packed."""
    packed = 0
    for m in module.modules():
        if type(m) is Linear and packable(m.weight):
            m.__class__ = PackedLinear
            m.pack()
            packed += 1
    fuse_activations(module)
    return packed


def fuse_activations(module: nn.Module) -> None:
    """A packed product followed by a tanh GELU module (``FUSIBLE`` names) takes the GELU as
    its post-op; the GELU module becomes an identity (its parent's forward is unchanged)."""
    for m in module.modules():
        for product, act in FUSIBLE:
            p, a = getattr(m, product, None), getattr(m, act, None)
            if (
                isinstance(p, PackedLinear)
                and p._packed is not None
                and p.activation == "none"
                and type(a) is nn.GELU
                and a.approximate == "tanh"
            ):
                p.activation = "gelu_tanh"
                setattr(m, act, nn.Identity())
