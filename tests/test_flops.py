"""scripts/bench_models.py counts every FLOP of the forward, even those torch misses."""

import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel as DiffusersUNet
from tiny import UNET_SD1
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ldm.accel import matmul
from ldm.accel.cpu import apply_ldm_cpu
from ldm.models.unet import UNet2DConditionModel, UNetConfig

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
try:
    import bench_models
finally:
    sys.path.pop(0)


def test_forward_flops_equal_torch_count_of_the_math_attention_path(monkeypatch):
    """The CPU flash kernel gets the FLOPs of the two bmm the math path runs instead."""
    monkeypatch.setattr(matmul, "PREFER_ONEDNN", False)  # products torch counts itself (MKL)
    torch.manual_seed(0)
    model = UNet2DConditionModel(UNetConfig.from_diffusers(UNET_SD1))
    apply_ldm_cpu(model)
    args = (torch.randn(2, 4, 8, 8), torch.tensor([999, 10]), torch.randn(2, 5, 32))
    total, attention = bench_models.forward_flops(model, args)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args)  # attention as matmul -> softmax -> matmul, which torch counts as bmm
    bmm = counter.get_flop_counts()["Global"][torch.ops.aten.bmm]
    assert attention == bmm > 0
    assert total == counter.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as stock:
        model(*args)
    assert stock.get_total_flops() == total - attention  # what torch alone counts: no attention


def test_forward_flops_equal_diffusers_count_on_any_route(monkeypatch):
    """Every product ldm.accel.matmul may route to is counted: the total equals torch's count
    of diffusers' U-Net (F.linear, nn.Conv2d, math attention), whichever GEMM ldm takes."""
    torch.manual_seed(0)
    ref = DiffusersUNet(**UNET_SD1)
    model = UNet2DConditionModel(UNetConfig.from_diffusers(UNET_SD1))
    apply_ldm_cpu(model)  # ldm's CPU routes
    args = (torch.randn(2, 4, 8, 8), torch.tensor([999, 10]), torch.randn(2, 5, 32))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        ref(*args)
    monkeypatch.setattr(matmul, "WEIGHT_FIRST_MIN_ELEMENTS", 0)  # weight-first on MKL too
    for prefer_onednn in (False, True):  # MKL (Intel) or oneDNN's inner product (e.g. AMD)
        monkeypatch.setattr(matmul, "PREFER_ONEDNN", prefer_onednn)
        assert bench_models.forward_flops(model, args)[0] == counter.get_total_flops()


def test_attention_flops_closed_form():
    # (B, heads, L, d): q k^T is 2*B*h*Lq*Lk*d_qk, p v is 2*B*h*Lq*Lk*d_v
    assert bench_models.attention_flops((2, 8, 64, 4), (2, 8, 5, 4), (2, 8, 5, 6)) == (
        2 * 2 * 8 * 64 * 5 * 4 + 2 * 2 * 8 * 64 * 5 * 6
    )
