"""ldm.accel: every mode keeps the state dict and the outputs of the plain model; resolve rules."""

import copy

import pytest
import torch
from tiny import UNET_SD1, UNET_SD2, VAE

from ldm import accel
from ldm.accel import openvino as accel_openvino
from ldm.accel.conv import Conv2d as RoutedConv2d
from ldm.errors import LdmError
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.unet import UNet2DConditionModel, UNetConfig

CPU = torch.device("cpu")


def _unet(cfg: dict = UNET_SD1) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(UNetConfig.from_diffusers(cfg)).eval()


def _inputs(batch: int = 2, size: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 7, 32, generator=g)


def _same_state(before: dict, module: torch.nn.Module) -> None:
    after = module.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].is_contiguous(), key  # safetensors needs it
        assert torch.equal(after[key], value), key


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    scale = b.abs().max().item()
    assert scale > 0.1
    assert (a - b).abs().max().item() <= rel * scale


# resolve ---------------------------------------------------------------------------------------


def test_resolve_explicit_env_and_auto(monkeypatch):
    monkeypatch.delenv(accel.ENV_VAR, raising=False)
    assert accel.resolve("off", CPU, torch.float32).mode == "off"
    auto = accel.resolve(None, CPU, torch.float32)
    assert auto.mode in accel.MODES[1:] and auto.reason.startswith("auto:")
    assert accel.resolve(None, torch.device("cuda"), torch.float16).mode == "off"
    monkeypatch.setenv(accel.ENV_VAR, "inductor")
    assert accel.resolve(None, CPU, torch.float32).mode == "inductor"
    assert accel.resolve("off", CPU, torch.float32).mode == "off"  # the argument wins


def test_cpu_modes_on_cuda_give_the_stock_modules():
    for mode in ("ldm-cpu", "openvino"):
        decision = accel.resolve(mode, torch.device("cuda"), torch.float16)
        assert decision.mode == "off" and "CPU only" in decision.reason


@pytest.mark.parametrize("bad", ["fast", "OpenVINO", ""])
def test_unknown_mode_is_one_line_error(bad, monkeypatch):
    monkeypatch.setenv(accel.ENV_VAR, bad or "nope")
    with pytest.raises(LdmError, match="choose one of auto, ldm-cpu, inductor, openvino, off") as e:
        accel.resolve(bad or None, CPU, torch.float32)
    assert "\n" not in str(e.value)


# ldm-cpu ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [UNET_SD1, UNET_SD2], ids=["sd1", "sd2"])
def test_ldm_cpu_keeps_state_dict_and_outputs(cfg):
    plain = _unet(cfg)
    fast = copy.deepcopy(plain)
    before = plain.state_dict()
    decision = accel.apply(fast, "ldm-cpu", device=CPU, dtype=torch.float32)
    assert decision.mode == "ldm-cpu"
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not fast.conv_in.weight.is_contiguous()
    _same_state(before, fast)
    x, context = _inputs()
    with torch.no_grad():
        out, ref = fast(x, 20, context), plain(x, 20, context)
    assert out.is_contiguous()
    _close(out, ref, 1e-5)
    fresh = _unet(cfg)  # what it saves loads into a plain model
    fresh.load_state_dict(fast.state_dict(), strict=True)


def test_ldm_cpu_backward_runs_in_channels_last_with_the_same_gradients():
    """The loss's (contiguous) gradient enters the backward in the weights' channels_last layout,
    so weight gradients keep their parameter's layout; the gradients are unchanged."""
    plain = _unet().train()
    fast = copy.deepcopy(plain)
    accel.apply(fast, "ldm-cpu", device=CPU, dtype=torch.float32, training=True)
    seen = []

    # runs after ldm-cpu's own hook on the same output, so it sees the gradient conv_out gets
    def probe(module, args, out):
        out.register_hook(seen.append)

    fast.conv_out.register_forward_hook(probe)
    x, context = _inputs()
    fast(x, 20, context).square().mean().backward()
    plain(x, 20, context).square().mean().backward()
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    ref_grads = dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-5)


def test_ldm_cpu_on_the_autoencoder():
    torch.manual_seed(0)
    plain = AutoencoderKL(AutoencoderConfig.from_diffusers(VAE)).eval()
    fast = copy.deepcopy(plain)
    before = plain.state_dict()
    accel.apply(fast, "ldm-cpu", device=CPU, dtype=torch.float32)
    _same_state(before, fast)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _close(fast.decode(z), plain.decode(z), 1e-5)


# inductor --------------------------------------------------------------------------------------


def test_inductor_keeps_state_dict_and_outputs():
    torch.manual_seed(0)  # a small module: compiling the U-Net would take a minute
    plain = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU())
    fast = copy.deepcopy(plain)
    before = plain.state_dict()
    assert accel.apply(fast, "inductor", device=CPU, dtype=torch.float32).mode == "inductor"
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        _close(fast(x), plain(x), 1e-5)
    _same_state(before, fast)


# openvino --------------------------------------------------------------------------------------

needs_openvino = pytest.mark.skipif(not accel_openvino.available(), reason="openvino missing")


@needs_openvino
def test_openvino_keeps_state_dict_outputs_and_caches_on_disk(tmp_path, monkeypatch):
    plain = _unet()
    fast = copy.deepcopy(plain)
    before = plain.state_dict()
    opts = dict(device=CPU, dtype=torch.float32, cache_dir=tmp_path)
    assert accel.apply(fast, "openvino", **opts).mode == "openvino"
    _same_state(before, fast)
    x, context = _inputs()
    with torch.no_grad():
        _close(fast(x, 20, context), plain(x, 20, context), 1e-5)
        t = torch.tensor([999.0, 3.0])  # another timestep: an input, not a traced constant
        _close(fast(x, t, context), plain(x, t, context), 1e-5)
    assert len(list(tmp_path.glob("*.xml"))) == 1  # one conversion per input shapes
    # a new process (a fresh copy) reads the converted models back instead of converting
    import openvino

    monkeypatch.setattr(openvino, "convert_model", lambda *a, **k: pytest.fail("converted"))
    again = copy.deepcopy(plain)
    accel.apply(again, "openvino", **opts)
    with torch.no_grad():
        _close(again(x, 20, context), plain(x, 20, context), 1e-5)


@needs_openvino
def test_openvino_decodes_like_the_plain_autoencoder(tmp_path):
    torch.manual_seed(0)
    plain = AutoencoderKL(AutoencoderConfig.from_diffusers(VAE)).eval()
    fast = copy.deepcopy(plain)
    accel.apply(fast, "openvino", device=CPU, dtype=torch.float32, cache_dir=tmp_path)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _close(fast.decode(z), plain.decode(z), 1e-5)


def test_openvino_refuses_training(tmp_path):
    with pytest.raises(LdmError, match="inference only"):
        accel.apply(_unet(), "openvino", device=CPU, dtype=torch.float32, training=True)


def test_ldm_cpu_on_a_peft_wrapped_unet():
    """LoRA training wraps proj_in (a 1x1 conv in SD 1.x) and the attention linears; ldm-cpu
    routes the wrapped base layers and leaves peft's own classes alone."""
    from peft import LoraConfig, inject_adapter_in_model

    plain = _unet()
    targets = ["proj_in", "proj_out", "to_q", "to_v"]
    config = LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False)
    inject_adapter_in_model(config, plain)
    fast = copy.deepcopy(plain)
    before = plain.state_dict()
    accel.apply(fast, "ldm-cpu", device=CPU, dtype=torch.float32, training=True)
    proj_in = fast.down_blocks[0].attentions[0].proj_in
    assert type(proj_in.base_layer) is RoutedConv2d and type(proj_in) is not RoutedConv2d
    _same_state(before, fast)
    x, context = _inputs()
    with torch.no_grad():
        _close(fast(x, 20, context), plain(x, 20, context), 1e-5)


def test_ldm_cpu_bf16_inference_leaves_many_row_products_to_f_linear(monkeypatch):
    """bf16 weights, no autograd, no autocast (a bf16 pipeline): many rows per image (SDXL's
    77 context tokens) run as F.linear, not oneDNN's 1x1 convolution (2.4x slower there)."""
    from ldm.accel import matmul

    monkeypatch.setattr(matmul, "PREFER_ONEDNN", True)
    conv = []
    real = matmul.onednn_linear
    monkeypatch.setattr(matmul, "onednn_linear", lambda *a: conv.append(a) or real(*a))
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 77, 64).bfloat16(), torch.randn(32, 64).bfloat16(), torch.randn(32)
    with torch.no_grad():
        out = matmul.linear(x, w, b.bfloat16())
    assert conv == []
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b.bfloat16()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: unchanged
        matmul.linear(x.float(), w.float(), b)
    assert len(conv) == 1
