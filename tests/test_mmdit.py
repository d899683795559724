"""ldm's SD3 / SD3.5 transformer against diffusers' SD3Transformer2DModel on identical random
weights (CPU fp32), its config checks, and strict loading both ways."""

import dataclasses
import inspect

import pytest
import torch
from diffusers import SD3Transformer2DModel as DiffusersSD3

from ldm.errors import ConfigError, LdmError
from ldm.models.build import NETWORKS
from ldm.models.mmdit import SD3Config, SD3Transformer2DModel
from ldm.models.mmdit_blocks import sincos_pos_embed_2d

# SD3-medium's shape, tiny: no q/k norm, no dual attention; caption width = heads x head dim
SD3_MEDIUM = dict(
    sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
    pooled_projection_dim=10, out_channels=4, pos_embed_max_size=12,
)  # fmt: skip
# SD3.5-medium's shape, tiny: RMS q/k norm, dual attention in the first blocks (not the last)
SD35_MEDIUM = dict(SD3_MEDIUM, num_layers=4, qk_norm="rms_norm", dual_attention_layers=(0, 1))
CONFIGS = {"sd3-medium": SD3_MEDIUM, "sd3.5-medium": SD35_MEDIUM}


def _pair(cfg: dict, seed: int = 0) -> tuple[DiffusersSD3, SD3Transformer2DModel]:
    """A random diffusers transformer and ldm's, loaded from it strictly (and back again)."""
    torch.manual_seed(seed)
    ref = DiffusersSD3(**cfg).eval()
    ours = SD3Transformer2DModel(SD3Config.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref, ours


def _inputs(b: int, h: int, w: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, h, w, generator=gen)
    context = torch.randn(b, 7, 12, generator=gen)
    pooled = torch.randn(b, 10, generator=gen)
    t = torch.tensor([3.0, 812.5, 500.0])[:b]  # SD3 timesteps are sigma * 1000, not integers
    return x, t, context, pooled


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    scale = a.abs().max().item()
    assert scale > 0.1  # a real output, not a zero-initialised one
    assert (a - b).abs().max().item() <= 1e-5 * scale


def _both(ref, ours, x, t, context, pooled, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        theirs = ref(x, context, pooled, t, **kw).sample
        mine = ours(x, t, encoder_hidden_states=context, pooled_projections=pooled, **kw)
    return theirs, mine


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(
    "batch, h, w",
    [(2, 8, 8), (3, 6, 10), (1, 24, 4)],  # square; non-square, off-centre crop; the table's edge
)
def test_matches_diffusers(name: str, batch: int, h: int, w: int) -> None:
    ref, ours = _pair(CONFIGS[name])
    _close(*_both(ref, ours, *_inputs(batch, h, w)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_skip_layers_match_diffusers(name: str) -> None:
    ref, ours = _pair(CONFIGS[name])
    inputs = _inputs(2, 6, 8)
    full = _both(ref, ours, *inputs)[1]
    last = len(ours.transformer_blocks) - 1
    for skip in ([1], [0, last], [last]):  # a dual block, the first, the context_pre_only one
        theirs, mine = _both(ref, ours, *inputs, skip_layers=skip)
        _close(theirs, mine)
        assert (mine - full).abs().max() > 1e-3  # skipping changes the prediction


def test_scalar_timestep_equals_a_batch_of_it() -> None:
    _, ours = _pair(SD3_MEDIUM)
    x, _, context, pooled = _inputs(2, 8, 8)
    with torch.no_grad():
        scalar = ours(x, 250.0, encoder_hidden_states=context, pooled_projections=pooled)
        batch = ours(x, torch.full((2,), 250.0), encoder_hidden_states=context,
                     pooled_projections=pooled)  # fmt: skip
    assert torch.equal(scalar, batch)


def test_position_table_equals_diffusers_at_init() -> None:
    """The buffer is computed independently (and saved): SD3.5-medium's table, 384 patches wide
    on a 64-patch base, against a fresh diffusers module's."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ref = get_2d_sincos_pos_embed(32, 384, base_size=64, output_type="pt").float()
    assert torch.allclose(sincos_pos_embed_2d(32, 384, 64), ref, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    theirs = DiffusersSD3(**SD35_MEDIUM).pos_embed.pos_embed
    mine = SD3Transformer2DModel(SD3Config(**SD35_MEDIUM)).pos_embed.pos_embed
    assert torch.allclose(mine, theirs, rtol=0, atol=1e-6)


def test_state_dict_keys_and_shapes_equal_diffusers() -> None:
    for cfg in CONFIGS.values():
        theirs = DiffusersSD3(**cfg).state_dict()
        mine = SD3Transformer2DModel(SD3Config(**cfg)).state_dict()
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}


def test_latent_larger_than_the_position_table_is_a_user_error() -> None:
    _, ours = _pair(SD3_MEDIUM)
    x, t, context, pooled = _inputs(1, 26, 8)  # 13 patches > pos_embed_max_size 12
    with pytest.raises(LdmError, match="pos_embed_max_size"):
        ours(x, t, encoder_hidden_states=context, pooled_projections=pooled)


def test_gradient_checkpointing_same_gradients() -> None:
    _, ours = _pair(SD35_MEDIUM)
    x, t, context, pooled = _inputs(2, 6, 6)
    grads = []
    for enabled in (False, True):
        ours.zero_grad()
        ours.enable_gradient_checkpointing(enabled)
        ours(
            x, t, encoder_hidden_states=context, pooled_projections=pooled
        ).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_config_round_trip_through_diffusers() -> None:
    config = SD3Config.from_diffusers(dict(SD35_MEDIUM, _class_name="SD3Transformer2DModel"))
    d = config.to_diffusers()
    assert SD3Config.from_diffusers(d) == config
    theirs = DiffusersSD3.from_config(d)
    assert tuple(theirs.config.dual_attention_layers) == (0, 1)
    assert NETWORKS["SD3Transformer2DModel"] == (SD3Config, SD3Transformer2DModel)


def test_out_channels_none_means_in_channels() -> None:
    assert SD3Config.from_diffusers(dict(SD3_MEDIUM, out_channels=None)).out_channels == 4


@pytest.mark.parametrize(
    "field, value",
    [
        ("qk_norm", "layer_norm"),
        ("pos_embed_max_size", None),
        ("caption_projection_dim", 24),
        ("dual_attention_layers", (0, 7)),
        ("use_rope", True),  # a field diffusers' SD3 class does not have
    ],
)
def test_unsupported_value_is_a_config_error_naming_it(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        SD3Config.from_diffusers(dict(SD3_MEDIUM, **{field: value}))


def test_every_diffusers_field_is_known() -> None:
    params = set(inspect.signature(DiffusersSD3.__init__).parameters) - {"self"}
    assert params == {f.name for f in dataclasses.fields(SD3Config)}


def test_flow_denoiser_drives_the_transformer() -> None:
    """ldm's flow Denoiser calls the network as (x, sigma * 1000, encoder_hidden_states=,
    pooled_projections=): denoised = x - sigma * velocity (SD3 paper eq. 1-3), and its loss
    differentiates through the transformer."""
    from ldm.denoiser import Denoiser
    from ldm.text.cond import Cond

    _, ours = _pair(SD35_MEDIUM)
    x, _, context, pooled = _inputs(2, 6, 8)
    sigma = torch.tensor([0.9, 0.25])
    denoiser = Denoiser(ours, None, prediction="flow")
    with torch.no_grad():
        denoised = denoiser(x, sigma, Cond(context, pooled))
        v = ours(x, sigma * 1000, encoder_hidden_states=context, pooled_projections=pooled)
    torch.testing.assert_close(denoised, x - sigma[:, None, None, None] * v)
    loss = denoiser.loss(x, torch.randn_like(x), sigma, Cond(context, pooled)).mean()
    loss.backward()
    assert ours.proj_out.weight.grad.abs().max() > 0
