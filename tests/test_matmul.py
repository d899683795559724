"""ldm's Linear: the weight-first product equals nn.Linear (values, gradients, layout, bf16)."""

import pytest
import torch
import torch.nn.functional as F

from ldm.models import matmul
from ldm.models.matmul import Linear, linear


@pytest.fixture
def any_weight_size(monkeypatch):
    """Let the small test weights take the weight-first route (it needs >= 1M elements)."""
    monkeypatch.setattr(matmul, "WEIGHT_FIRST_MIN_ELEMENTS", 0)


@pytest.fixture
def routes(monkeypatch):
    calls = []
    real = matmul.addmm_weight_first
    monkeypatch.setattr(matmul, "addmm_weight_first", lambda *a: calls.append(a) or real(*a))
    return calls


@pytest.mark.parametrize("tokens", [1, 16, 64, 65, 200])  # weight-first up to 64 per image
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_nn_linear(tokens, bias, any_weight_size, routes):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ours = Linear(24, 40, bias=bias)
    ref = torch.nn.Linear(24, 40, bias=bias)
    ref.load_state_dict(ours.state_dict(), strict=True)  # same parameter names
    x = torch.randn(3, tokens, 24, generator=g)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_o, out_r = ours(xo), ref(xr)
    assert len(routes) == (tokens <= matmul.WEIGHT_FIRST_MAX_ROWS)
    torch.testing.assert_close(out_o, out_r, rtol=1e-5, atol=1e-5)
    assert out_o.is_contiguous()  # the layout F.linear gives, whichever the route
    grad = torch.randn(out_r.shape, generator=g)
    out_o.backward(grad)
    out_r.backward(grad)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for po, pr in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(po.grad, pr.grad, rtol=1e-4, atol=1e-4)


def test_weight_first_takes_strided_inputs(any_weight_size, routes):
    torch.manual_seed(0)
    layer = Linear(16, 8)
    x = torch.randn(2, 16, 10).transpose(1, 2)  # (2, 10, 16), not contiguous
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert len(routes) == 1


def test_route_depends_on_tokens_per_image_and_weight_size_not_batch(routes):
    big, small = torch.randn(1024, 1024), torch.randn(1023, 1024)  # 2**20 elements and fewer
    for batch in (1, 2, 64):
        linear(torch.randn(batch, 64, 1024), big)
    assert len(routes) == 3
    linear(torch.randn(1, 65, 1024), big)  # more tokens per image: F.linear
    linear(torch.randn(2, 16, 1024), small)  # a weight that stays in cache: F.linear
    linear(torch.randn(2, 1024), big)  # a 2-D input (B, C), e.g. the time embedding: F.linear
    assert len(routes) == 3


def test_bf16_autocast_matches_f_linear(any_weight_size, routes):
    torch.manual_seed(0)
    layer = Linear(64, 32)
    x = torch.randn(2, 16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = layer(x)
        ref = F.linear(x, layer.weight, layer.bias)
    assert len(routes) == 1
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=2e-2)
