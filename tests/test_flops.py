"""scripts/bench_models.py counts attention's FLOPs, which torch's counter misses on the CPU."""

import sys
from pathlib import Path

import torch
from tiny import UNET_SD1
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ldm.models.unet import UNet2DConditionModel, UNetConfig

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
try:
    import bench_models
finally:
    sys.path.pop(0)


def test_forward_flops_equal_torch_count_of_the_math_attention_path():
    """The CPU flash kernel gets the FLOPs of the two bmm the math path runs instead."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(UNetConfig.from_diffusers(UNET_SD1))
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


def test_attention_flops_closed_form():
    # (B, heads, L, d): q k^T is 2*B*h*Lq*Lk*d_qk, p v is 2*B*h*Lq*Lk*d_v
    assert bench_models.attention_flops((2, 8, 64, 4), (2, 8, 5, 4), (2, 8, 5, 6)) == (
        2 * 2 * 8 * 64 * 5 * 4 + 2 * 2 * 8 * 64 * 5 * 6
    )
