"""ldm's Conv2d: the im2col GEMM route equals nn.Conv2d (values, gradients, layouts, autocast)."""

import pytest
import torch
import torch.nn.functional as F

from ldm.accel import conv, matmul
from ldm.accel.conv import Conv2d, conv2d_as_matmul


@pytest.mark.parametrize("order", ["x-first", "weight-first"])  # weight-first needs a big weight
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "kernel,stride,padding,size",
    [(3, 1, 1, 5), (3, 2, 1, 8), (3, 2, 0, 9), (1, 1, 0, 4), (3, 1, 1, 9)],  # 81 positions: x-first
)
def test_matmul_route_equals_conv2d(order, layout, kernel, stride, padding, size, monkeypatch):
    if order == "weight-first":
        monkeypatch.setattr(matmul, "WEIGHT_FIRST_MIN_ELEMENTS", 0)
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 24, size, size, generator=g).contiguous(memory_format=fmt)
    w = torch.randn(16, 24, kernel, kernel, generator=g).contiguous(memory_format=fmt)
    b = torch.randn(16, generator=g)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    ours = conv2d_as_matmul(xs, ws, bs, stride, padding)
    ref = F.conv2d(xr, wr, br, stride=stride, padding=padding)
    assert ours.shape == ref.shape
    assert ours.is_contiguous(memory_format=fmt)  # the caller's layout is kept
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(ref.shape, generator=g)
    ours.backward(grad)
    ref.backward(grad)
    for a, r in ((xs, xr), (ws, wr), (bs, br)):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-4)


@pytest.fixture
def calls(monkeypatch):
    """The GEMM-route calls a Conv2d makes (computed by F.conv2d instead)."""
    calls = []
    monkeypatch.setattr(conv, "conv2d_as_matmul", lambda *a: calls.append(a) or F.conv2d(
        a[0], a[1], a[2], stride=a[3], padding=a[4]))  # fmt: skip
    return calls


def test_module_routes_by_positions_per_image_and_channels(monkeypatch, calls):
    monkeypatch.setattr(matmul, "PREFER_ONEDNN", False)  # an Intel CPU: MKL's GEMM is fast
    wide, narrow = Conv2d(512, 8, 3, padding=1), Conv2d(64, 8, 3, padding=1)
    for batch in (1, 2, 16):  # the route never depends on the batch size
        wide(torch.randn(batch, 512, 8, 8))  # 64 positions per image, 512 channels: GEMM
    assert len(calls) == 3
    wide(torch.randn(1, 512, 16, 16))  # 256 positions per image: oneDNN
    narrow(torch.randn(1, 64, 4, 4))  # few channels: oneDNN
    assert len(calls) == 3
    Conv2d(1024, 8, 3, padding=1)(torch.randn(1, 1024, 16, 16))  # 4 channels per position: GEMM
    assert len(calls) == 4
    Conv2d(960, 8, 3, padding=1)(torch.randn(1, 960, 16, 16))  # fewer: oneDNN
    assert len(calls) == 4


def test_where_onednn_is_preferred_training_takes_the_gemm_route_for_few_positions(
    monkeypatch, calls
):
    monkeypatch.setattr(matmul, "PREFER_ONEDNN", True)  # e.g. an AMD CPU: MKL's GEMM is slow
    wide = Conv2d(1024, 8, 3, padding=1)
    with torch.no_grad():
        wide(torch.randn(2, 1024, 8, 8))  # the same rule as elsewhere: GEMM
        wide(torch.randn(2, 1024, 16, 16))
        assert len(calls) == 2
    # under autograd: GEMM (matmul.InnerProduct, oneDNN both ways) for up to 64 positions per
    # image; more, or bf16, where the product's backward would be MKL's: oneDNN's convolution
    wide(torch.randn(2, 1024, 8, 8))
    assert len(calls) == 3
    wide(torch.randn(2, 1024, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wide(torch.randn(2, 1024, 8, 8))
    assert len(calls) == 3


@pytest.mark.skipif(matmul.ONEDNN_MATMUL is None, reason="torch built without oneDNN")
def test_gemm_route_trains_like_conv2d(monkeypatch):
    """The GEMM route under autograd (where oneDNN is preferred): values and gradients."""
    monkeypatch.setattr(matmul, "PREFER_ONEDNN", True)
    inner, real = [], matmul.ONEDNN_MATMUL
    monkeypatch.setattr(matmul, "ONEDNN_MATMUL", lambda *a: inner.append(a) or real(*a))
    torch.manual_seed(0)
    ours = Conv2d(512, 16, 3, padding=1).to(memory_format=torch.channels_last)
    ref = torch.nn.Conv2d(512, 16, 3, padding=1)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 512, 4, 4).contiguous(memory_format=torch.channels_last)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_o, out_r = ours(xo), ref(xr)
    torch.testing.assert_close(out_o, out_r, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out_r)
    out_o.backward(grad)
    out_r.backward(grad)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
    # the weight's layout is kept: no copy when the gradient is accumulated or stepped
    assert ours.weight.grad.is_contiguous(memory_format=torch.channels_last)
    assert len(inner) == 2  # the inner product forward and the weight gradient


def test_module_under_bf16_autocast_matches_conv2d():
    torch.manual_seed(0)
    layer = Conv2d(512, 16, 3, padding=1)
    x = torch.randn(2, 512, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = layer(x)
        ref = F.conv2d(x, layer.weight, layer.bias, padding=1)
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=2e-2)
