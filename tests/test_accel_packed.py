"""ldm.accel.packed: weights packed once in oneDNN's layout give F.linear's products (and the
tanh GELU after them), keep the state dict, follow .to() and load_state_dict(), step aside for
autograd; a bf16 FLUX or SD3 transformer under ldm-cpu gives its plain output."""

import pytest
import torch
import torch.nn.functional as F
from test_flux_transformer import DEV, _inputs
from test_flux_transformer import _pair as _flux_pair
from test_mmdit import SD35_MEDIUM
from test_mmdit import _inputs as _sd3_inputs
from test_mmdit import _pair as _sd3_pair

from ldm import accel
from ldm.accel import attention, matmul, packed
from ldm.accel.matmul import Linear
from ldm.accel.packed import PackedLinear, pack_linears

CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(
    packed.ONEDNN_MATMUL is None or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="oneDNN without bf16 on this CPU",
)


@pytest.fixture(autouse=True)
def _fp32_packs_too(monkeypatch):
    """fp32 weights are packed where oneDNN is the faster library; test that route anywhere."""
    monkeypatch.setattr(matmul, "PREFER_ONEDNN", True)


def _layer(dtype: torch.dtype, bias: bool = True) -> tuple[torch.nn.Linear, PackedLinear]:
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 40, bias=bias).to(dtype).eval()
    fast = torch.nn.Linear(48, 40, bias=bias).to(dtype).eval()
    fast.load_state_dict(plain.state_dict())
    fast.__class__ = Linear
    assert pack_linears(fast) == 1 and type(fast) is PackedLinear and fast._packed is not None
    return plain, fast


def _tol(dtype: torch.dtype) -> dict:
    return dict(rtol=0, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_product_equals_f_linear_and_keeps_the_state_dict(dtype, bias):
    plain, fast = _layer(dtype, bias)
    x = torch.randn(2, 9, 48).to(dtype)
    with torch.no_grad():
        for rows in (x, x[:, 2:], x[:, :1], x[0]):  # many rows, strided, one row per image, 2-D
            torch.testing.assert_close(fast(rows), plain(rows), **_tol(dtype))
    assert fast.weight.untyped_storage().nbytes() <= 4  # the dense weight is released
    state = fast.state_dict()
    assert list(state) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert state[key].is_contiguous() and torch.equal(state[key], value), key


@needs_bf16
def test_load_state_dict_and_to_float32_repack_or_unpack():
    plain, fast = _layer(torch.bfloat16)
    torch.manual_seed(5)
    other = torch.nn.Linear(48, 40).bfloat16()
    fast.load_state_dict(other.state_dict())
    assert fast._packed is not None
    x = torch.randn(3, 48).bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), other(x), **_tol(torch.bfloat16))
        fast.float()  # fp32 packs again where oneDNN owns fp32 (the fixture), else stays dense
        assert fast.weight.dtype == torch.float32 and fast._packed.dtype == torch.float32
        torch.testing.assert_close(fast(x.float()), other.float()(x.float()), rtol=1e-5, atol=1e-5)


@needs_bf16
def test_deepcopy_and_pickle_give_a_dense_working_copy():
    import copy
    import pickle

    plain, fast = _layer(torch.bfloat16)
    fast.activation = "gelu_tanh"
    x = torch.randn(3, 48).bfloat16()
    for other in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert other._packed is None and fast._packed is not None
        with torch.no_grad():
            torch.testing.assert_close(other(x), fast(x), **_tol(torch.bfloat16))
            wide = other.float()(x.float())  # pixels.py's fp32 VAE is such a copy
            torch.testing.assert_close(wide, F.gelu(plain.float()(x.float()), approximate="tanh"))


@needs_bf16
def test_autograd_gets_the_dense_weight_and_its_gradient():
    plain, fast = _layer(torch.bfloat16)
    x = torch.randn(4, 48, dtype=torch.bfloat16, requires_grad=True)
    fast(x).square().sum().backward()
    assert fast._packed is None  # unpacked for good
    x2 = x.detach().clone().requires_grad_(True)
    plain(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **_tol(torch.bfloat16))


@needs_bf16
def test_bf16_flux_under_ldm_cpu_fuses_the_gelu_and_gives_the_plain_output():
    _, plain = _flux_pair(DEV)
    _, fast = _flux_pair(DEV)
    plain.bfloat16()
    fast.bfloat16()
    before = fast.state_dict()
    accel.apply(fast, "ldm-cpu", device=CPU, dtype=torch.bfloat16)
    single = fast.single_transformer_blocks[0]
    assert single.proj_mlp.activation == "gelu_tanh"
    assert type(single.act_mlp) is torch.nn.Identity
    assert fast.transformer_blocks[0].ff.net[0].proj.activation == "gelu_tanh"
    assert (
        single.attn.sdpa is attention.sdpa
        and plain.transformer_blocks[0].attn.sdpa is F.scaled_dot_product_attention
    )
    after = fast.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    kw = {k: v.bfloat16() if v.is_floating_point() else v for k, v in _inputs(DEV, 2, 8, 8).items()}
    with torch.no_grad():
        mine, ref = fast(**kw).float(), plain(**kw).float()
    assert (mine - ref).abs().max() <= 3e-2 * ref.abs().max()


@needs_bf16
def test_bf16_sd3_under_ldm_cpu_gives_the_plain_output_and_training_packs_nothing():
    _, plain = _sd3_pair(SD35_MEDIUM)
    _, fast = _sd3_pair(SD35_MEDIUM)
    _, trained = _sd3_pair(SD35_MEDIUM)
    for m in (plain, fast, trained):
        m.bfloat16()
    accel.apply(fast, "ldm-cpu", device=CPU, dtype=torch.bfloat16)
    accel.apply(trained, "ldm-cpu", device=CPU, dtype=torch.bfloat16, training=True)
    assert not any(isinstance(m, PackedLinear) for m in trained.modules())
    assert not any("sdpa" in vars(m) for m in trained.modules())  # training: torch's kernel
    x, t, context, pooled = (v.bfloat16() for v in _sd3_inputs(2, 8, 8))
    with torch.no_grad():
        mine = fast(x, t, encoder_hidden_states=context, pooled_projections=pooled).float()
        ref = plain(x, t, encoder_hidden_states=context, pooled_projections=pooled).float()
    assert (mine - ref).abs().max() <= 3e-2 * ref.abs().max()
    assert F.mse_loss(mine, ref) < 1e-3 * ref.square().mean()


# attention ---------------------------------------------------------------------------------------


@needs_bf16
@pytest.mark.parametrize("b, heads, n, s, d", [(1, 3, 40, 40, 16), (2, 2, 17, 33, 8)])
def test_cpu_attention_equals_sdpa_in_bf16_and_keeps_its_layout(b, heads, n, s, d):
    from ldm.accel.attention import sdpa

    g = torch.Generator().manual_seed(0)
    q = (3 * torch.randn(b, n, heads, d, generator=g)).bfloat16().transpose(1, 2)  # a view
    k, v = ((3 * torch.randn(b, heads, s, d, generator=g)).bfloat16() for _ in range(2))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    with torch.no_grad():
        mine, flash = sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v)
    assert mine.stride() == flash.stride()  # (B, L, heads, d) in memory: transpose is a view
    err, flash_err = ((t.double() - exact).abs().max().item() for t in (mine, flash))
    assert err <= 2 * flash_err + 1e-2, (err, flash_err)


def test_cpu_attention_leaves_fp32_and_autograd_to_sdpa():
    from ldm.accel.attention import routed, sdpa

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    assert torch.equal(sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))
    qb = q.bfloat16().requires_grad_(True)
    assert not routed(qb, k.bfloat16(), v.bfloat16())
    with torch.no_grad():
        assert routed(qb, k.bfloat16(), v.bfloat16()) == (packed.ONEDNN_MATMUL is not None)
