"""ldm's Linear: the weight-first product equals nn.Linear (values, gradients, layout, bf16)."""

import pytest
import torch
import torch.nn.functional as F

from ldm.accel import matmul
from ldm.accel.matmul import Linear, linear


@pytest.fixture
def any_weight_size(monkeypatch):
    """Let the small test weights take the weight-first route (it needs >= 1M elements)."""
    monkeypatch.setattr(matmul, "WEIGHT_FIRST_MIN_ELEMENTS", 0)


@pytest.fixture(autouse=True)
def intel_cpu(monkeypatch):
    """MKL for every product unless a test says otherwise (the rule on an Intel CPU)."""
    monkeypatch.setattr(matmul, "PREFER_ONEDNN", False)


@pytest.fixture
def onednn_calls(monkeypatch):
    """Where oneDNN is preferred (e.g. an AMD CPU), recording its products by op."""
    monkeypatch.setattr(matmul, "PREFER_ONEDNN", True)
    calls = {"conv": [], "inner": []}
    conv, inner = matmul.onednn_linear, matmul.ONEDNN_MATMUL
    monkeypatch.setattr(matmul, "onednn_linear", lambda *a: calls["conv"].append(a) or conv(*a))
    monkeypatch.setattr(matmul, "ONEDNN_MATMUL", lambda *a: calls["inner"].append(a) or inner(*a))
    return calls


@pytest.fixture
def routes(monkeypatch):
    calls = []
    real = matmul.addmm_weight_first
    monkeypatch.setattr(matmul, "addmm_weight_first", lambda *a: calls.append(a) or real(*a))
    return calls


def check_like_nn_linear(x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """ldm's Linear against nn.Linear on x: values, layout, input and parameter gradients."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ours = Linear(x.shape[-1], 40, bias=bias)
    ref = torch.nn.Linear(x.shape[-1], 40, bias=bias)
    ref.load_state_dict(ours.state_dict(), strict=True)  # same parameter names
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_o, out_r = ours(xo), ref(xr)
    torch.testing.assert_close(out_o, out_r, rtol=1e-5, atol=1e-5)
    assert out_o.is_contiguous()  # the layout F.linear gives, whichever the route
    grad = torch.randn(out_r.shape, generator=g)
    out_o.backward(grad)
    out_r.backward(grad)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for po, pr in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(po.grad, pr.grad, rtol=1e-4, atol=1e-4)
    return out_o


@pytest.mark.parametrize("tokens", [1, 16, 64, 65, 200])  # weight-first up to 64 per image
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_nn_linear(tokens, bias, any_weight_size, routes):
    check_like_nn_linear(torch.randn(3, tokens, 24), bias)
    assert len(routes) == (tokens <= matmul.WEIGHT_FIRST_MAX_ROWS)


@pytest.mark.parametrize("tokens", [16, 32, 33, 64])
def test_bf16_goes_weight_first_only_up_to_its_own_row_limit(tokens, any_weight_size, routes):
    """bf16 GEMMs gain nothing weight-first at 64 rows and the transposed result costs a copy."""
    layer = Linear(24, 40).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(3, tokens, 24, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = layer(x)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias))
    assert len(routes) == (tokens <= matmul.WEIGHT_FIRST_MAX_ROWS_BF16)


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
    assert len(routes) == 3
    for batch in (1, 2, 64):  # a 2-D input (B, C), e.g. the time embedding: one row per image
        linear(torch.randn(batch, 1024), big)
    assert len(routes) == 6
    linear(torch.randn(2, 1024), small)
    linear(torch.randn(1024), big)  # a single vector: F.linear
    assert len(routes) == 6


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_one_vector_per_image_equals_nn_linear(batch, any_weight_size, routes):
    assert check_like_nn_linear(torch.randn(batch, 24)).shape == (batch, 40)
    assert len(routes) == 1


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


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_onednn_linear_equals_nn_linear(layout, onednn_calls):
    """Many rows per image go to oneDNN's 1x1 convolution: same values, gradients, layout."""
    x = torch.randn(3, 100, 48) if layout == "contiguous" else torch.randn(3, 48, 100).mT
    check_like_nn_linear(x)
    assert len(onednn_calls["conv"]) == 1
    layer = Linear(48, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, low_ref = layer(x), F.linear(x, layer.weight, layer.bias)
    assert low.dtype == low_ref.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), low_ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(matmul.ONEDNN_MATMUL is None, reason="torch built without oneDNN")
@pytest.mark.parametrize("shape", [(2, 100, 48), (2, 16, 48), (3, 48)])
def test_onednn_inner_product_equals_f_linear(shape, onednn_calls):
    """Without autograd every fp32 product there goes to oneDNN's inner product."""
    torch.manual_seed(0)
    layer = Linear(48, 40)
    x = torch.randn(shape)
    with torch.no_grad():
        ours = layer(x)
    assert len(onednn_calls["inner"]) == 1 and ours.is_contiguous()
    torch.testing.assert_close(ours, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(matmul.ONEDNN_MATMUL is None, reason="torch built without oneDNN")
def test_where_onednn_is_preferred_routes(onednn_calls, routes):
    big = torch.randn(1024, 1024)
    with torch.no_grad():
        linear(torch.randn(2, 65, 1024), big)  # fp32, no autograd: the inner product, any rows
        linear(torch.randn(2, 64, 1024), big)
        linear(torch.randn(2, 1024), big[:512])
        with torch.autocast("cpu", dtype=torch.bfloat16):  # not fp32: the 1x1 convolution
            linear(torch.randn(2, 65, 1024), big)
    assert (len(onednn_calls["inner"]), len(onednn_calls["conv"]), len(routes)) == (3, 1, 0)
    # under autograd many rows per image go to oneDNN's 1x1 convolution, few to InnerProduct
    # (the inner product with a oneDNN backward); never MKL weight-first
    linear(torch.randn(2, 65, 1024, requires_grad=True), big)
    linear(torch.randn(2, 64, 1024, requires_grad=True), big)
    assert (len(onednn_calls["inner"]), len(onednn_calls["conv"]), len(routes)) == (4, 2, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 few rows under autograd: MKL
        linear(torch.randn(2, 64, 1024, requires_grad=True), big)
    assert (len(onednn_calls["inner"]), len(onednn_calls["conv"]), len(routes)) == (4, 2, 0)


@pytest.mark.skipif(matmul.ONEDNN_MATMUL is None, reason="torch built without oneDNN")
@pytest.mark.parametrize("shape", [(3, 16, 48), (2, 48), (2, 7, 48)])
def test_inner_product_trains_like_nn_linear(shape, onednn_calls):
    """Few rows under autograd: InnerProduct's values and all three gradients."""
    x = torch.randn(shape) if len(shape) == 2 else torch.randn(shape).transpose(0, 1)
    check_like_nn_linear(x)  # a strided input too: (7, 2, 48) transposed
    check_like_nn_linear(x, bias=False)
    # forward, then the weight gradient, per call; the input gradient is a convolution's
    assert len(onednn_calls["inner"]) == 4 and len(onednn_calls["conv"]) == 0


@pytest.mark.skipif(matmul.ONEDNN_MATMUL is None, reason="torch built without oneDNN")
def test_inner_product_with_frozen_weight_computes_no_weight_gradient(onednn_calls):
    """LoRA trains adapters beside frozen weights: only the input gradient is computed."""
    layer = Linear(48, 40).requires_grad_(False)
    x = torch.randn(2, 16, 48, requires_grad=True)
    layer(x).sum().backward()
    assert len(onednn_calls["inner"]) == 1 and layer.weight.grad is None
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(2, 16, 48))


@pytest.mark.skipif(matmul.ONEDNN_MATMUL is None, reason="torch built without oneDNN")
def test_a_bias_that_trains_keeps_autograd_routes(onednn_calls):
    """The inner product has no backward: a trainable bias alone rules it out."""
    layer = Linear(48, 40)
    layer.weight.requires_grad_(False)
    layer(torch.randn(2, 100, 48)).sum().backward()
    assert len(onednn_calls["inner"]) == 0 and len(onednn_calls["conv"]) == 1
    torch.testing.assert_close(layer.bias.grad, torch.full((40,), 200.0))


@pytest.mark.skipif(matmul.ONEDNN_MATMUL is None, reason="torch built without oneDNN")
@pytest.mark.parametrize("grad", [False, True])
def test_inner_product_takes_a_strided_bias_and_no_rows(grad, onednn_calls):
    """oneDNN reads a bias densely whatever its strides; an empty batch has no oneDNN backward."""
    x, weight = torch.randn(5, 48), torch.randn(40, 48, requires_grad=grad)
    bias = torch.randn(40, 2)[:, 0].requires_grad_(grad)  # strided, as a view of a wider tensor
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias))
        empty = linear(torch.randn(0, 16, 48), weight, bias)
    assert empty.shape == (0, 16, 40)
    if grad:
        empty.sum().backward()
        torch.testing.assert_close(weight.grad, torch.zeros_like(weight))
