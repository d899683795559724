"""ldm's U-Net against diffusers' UNet2DConditionModel on identical random weights (CPU fp32)."""

import pytest
import torch
from diffusers import UNet2DConditionModel as DiffusersUNet
from tiny import UNET_SD1, UNET_SD2

from ldm.errors import ConfigError
from ldm.models.unet import UNet2DConditionModel, UNetConfig

CONFIGS = {
    "sd1": UNET_SD1,
    "sd2": UNET_SD2,
    # two transformer layers in the first block, per-block head counts, two resnets per block
    "depth2_heads": dict(
        UNET_SD1, transformer_layers_per_block=(2, 1), attention_head_dim=(2, 4), layers_per_block=2
    ),
}


def _pair(cfg: dict, seed: int = 0) -> tuple[DiffusersUNet, UNet2DConditionModel]:
    """A random diffusers U-Net and ldm's, loaded from it strictly (and back again)."""
    torch.manual_seed(seed)
    ref = DiffusersUNet(**cfg).eval()
    ours = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref, ours


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = a.abs().max().item()
    assert scale > 0.1  # a real output, not a zero-initialised one
    assert (a - b).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name: str) -> None:
    ref, ours = _pair(CONFIGS[name])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 7, 32, generator=gen)
    t = torch.tensor([10.0, 731.5])
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0
    with torch.no_grad():
        _close(ref(x, t, context).sample, ours(x, t, context))
        _close(ref(x, t, context, encoder_attention_mask=mask).sample, ours(x, t, context, mask))
        # scalar timestep, odd latent size (upsampling must match the skip sizes)
        x_odd = x[:, :, :5, :7]
        _close(ref(x_odd, 999, context).sample, ours(x_odd, 999, context))


def test_mask_changes_output() -> None:
    _, ours = _pair(UNET_SD1)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32)
    mask = torch.ones(1, 7)
    mask[0, 3:] = 0
    with torch.no_grad():
        full, masked = ours(x, 5, context), ours(x, 5, context, mask)
        truncated = ours(x, 5, context[:, :3])
    assert (full - masked).abs().max() > 1e-4
    torch.testing.assert_close(masked, truncated, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_same_gradients() -> None:
    _, ours = _pair(CONFIGS["depth2_heads"])
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)

    def grads() -> dict[str, torch.Tensor]:
        ours.zero_grad(set_to_none=True)
        ours(x, torch.tensor([3, 400]), context).square().mean().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    calls = []
    resnet = ours.down_blocks[0].resnets[0]
    forward = resnet.forward
    resnet.forward = lambda *args: calls.append(1) or forward(*args)  # count (re)computations
    ours.train()
    plain = grads()
    assert len(calls) == 1
    ours.enable_gradient_checkpointing()
    checked = grads()
    assert len(calls) == 3  # recomputed during backward: checkpointing really happened
    for name, g in plain.items():
        torch.testing.assert_close(checked[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_config_round_trip_through_diffusers() -> None:
    cfg = UNetConfig.from_diffusers(dict(UNET_SD2, _class_name="UNet2DConditionModel"))
    assert cfg.use_linear_projection and cfg.heads() == (2, 4)
    d = cfg.to_diffusers()
    assert d["_class_name"] == "UNet2DConditionModel"
    ref = DiffusersUNet.from_config(d)
    ours = UNet2DConditionModel(cfg)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert UNetConfig.from_diffusers(dict(ref.config)) == cfg


@pytest.mark.parametrize(
    "field, value",
    [
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text"),  # text_time (SDXL) works; the others are refused
        ("only_cross_attention", True),
        ("resnet_time_scale_shift", "scale_shift"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("num_attention_heads", 8),
        ("no_such_field", 1),
    ],
)
def test_unsupported_field_is_a_config_error(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        UNetConfig.from_diffusers(dict(UNET_SD1, **{field: value}))


def test_text_time_without_its_sizes_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="addition_time_embed_dim"):
        UNetConfig.from_diffusers(dict(UNET_SD1, addition_embed_type="text_time"))


def test_default_valued_unsupported_fields_are_accepted() -> None:
    cfg = dict(UNET_SD1, class_embed_type=None, only_cross_attention=[False, False])
    cfg.update(_diffusers_version="0.30.0", _name_or_path="x", addition_embed_type_num_heads=64)
    assert UNetConfig.from_diffusers(cfg).block_out_channels == (32, 64)


def test_every_diffusers_field_is_known():
    """Each UNet2DConditionModel argument is implemented or refused by name (never ignored)."""
    import dataclasses
    import inspect

    from diffusers import UNet2DConditionModel as Theirs

    from ldm.models.unet import _UNSUPPORTED

    params = set(inspect.signature(Theirs.__init__).parameters) - {"self"}
    known = {f.name for f in dataclasses.fields(UNetConfig)} | set(_UNSUPPORTED)
    assert params <= known, sorted(params - known)
