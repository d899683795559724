"""ldm's FLUX.1 transformer against diffusers' FluxTransformer2DModel on identical random weights
(CPU fp32), its RoPE against FluxPosEmbed, the packing against FluxPipeline's static methods,
PackedFlux behind the Denoiser, config checks and strict loading both ways."""

import inspect

import pytest
import torch
from diffusers import FluxPipeline
from diffusers import FluxTransformer2DModel as DiffusersFlux
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from ldm.denoiser import Denoiser, Flow
from ldm.errors import ConfigError
from ldm.models.flux import ROPE_THETA, FluxConfig, FluxTransformer2DModel
from ldm.models.flux_packing import (
    PackedFlux,
    image_ids,
    latent_size,
    pack_latents,
    text_ids,
    unpack_latents,
)
from ldm.models.rope import apply_rope, rope_table
from ldm.text.cond import Cond

# FLUX.1's shape, tiny: 2 double + 2 single blocks, RoPE axes summing to the head width
SCHNELL = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
    guidance_embeds=False, axes_dims_rope=(4, 6, 6),
)  # fmt: skip
DEV = dict(SCHNELL, guidance_embeds=True)
DEPTH = dict(DEV, in_channels=32, out_channels=16)  # FLUX.1-Depth/Canny: 128 -> 64, tiny
DOUBLE_ONLY = dict(DEV, num_single_layers=0)  # the image tokens leave from a double block
CONFIGS = {"schnell": SCHNELL, "dev": DEV, "depth": DEPTH, "double-only": DOUBLE_ONLY}


def _pair(cfg: dict, seed: int = 0) -> tuple[DiffusersFlux, FluxTransformer2DModel]:
    """A random diffusers transformer and ldm's, loaded from it strictly (and back again)."""
    torch.manual_seed(seed)
    ref = DiffusersFlux(**cfg).eval()
    ours = FluxTransformer2DModel(FluxConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref, ours


def _diffusers_ids(h: int, w: int) -> torch.Tensor:
    """FluxPipeline's image ids of an h x w grid of packed tokens."""
    return FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)


def _inputs(cfg: dict, b: int, h: int, w: int, s: int = 5, seed: int = 1) -> dict:
    """Packed tokens of an h x w latent, T5-like tokens, pooled text, ids, t [, guidance]."""
    gen = torch.Generator().manual_seed(seed)
    kw = dict(
        hidden_states=torch.randn(b, (h // 2) * (w // 2), cfg["in_channels"], generator=gen),
        encoder_hidden_states=torch.randn(b, s, cfg["joint_attention_dim"], generator=gen),
        pooled_projections=torch.randn(b, cfg["pooled_projection_dim"], generator=gen),
        timestep=torch.tensor([1.0, 0.6389, 0.0312])[:b],  # sigma: FluxPipeline passes t / 1000
        img_ids=_diffusers_ids(h // 2, w // 2),
        txt_ids=torch.zeros(s, 3),
    )
    if cfg["guidance_embeds"]:
        kw["guidance"] = torch.tensor([3.5, 1.0, 7.0])[:b]  # the raw scale, as the pipeline
    return kw


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert a.shape == b.shape
    scale = a.abs().max().item()
    assert scale > 0.1  # a real output, not a zero-initialised one
    assert (a - b).abs().max().item() <= rel * scale


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch, h, w, s", [(2, 8, 8, 5), (3, 6, 10, 7), (1, 2, 12, 1)])
def test_matches_diffusers(name: str, batch: int, h: int, w: int, s: int) -> None:
    ref, ours = _pair(CONFIGS[name])
    kw = _inputs(CONFIGS[name], batch, h, w, s)
    with torch.no_grad():
        theirs = ref(**kw, return_dict=False)[0]
        mine = ours(**kw)
    _close(theirs, mine)


def test_guidance_and_timestep_matter() -> None:
    """The guidance scale reaches the output (x1000, as diffusers), and so does the timestep."""
    _, ours = _pair(DEV)
    kw = _inputs(DEV, 2, 4, 4)
    with torch.no_grad():
        base = ours(**kw)
        assert (ours(**{**kw, "guidance": kw["guidance"] + 0.5}) - base).abs().max() > 1e-3
        assert (ours(**{**kw, "timestep": kw["timestep"] * 0.5}) - base).abs().max() > 1e-3


def test_guidance_required_iff_embedded() -> None:
    _, dev = _pair(DEV)
    _, schnell = _pair(SCHNELL)
    kw = _inputs(DEV, 1, 4, 4)
    with pytest.raises(ValueError, match="guidance"):
        dev(**{k: v for k, v in kw.items() if k != "guidance"})
    with pytest.raises(ValueError, match="no guidance embedding"):
        schnell(**kw)
    with pytest.raises(ValueError, match="img_ids"):
        dev(**{**kw, "img_ids": None})


def test_bf16_close_to_diffusers_bf16() -> None:
    """Both in bf16 (t rounded to bf16 before x1000, as diffusers): same rounding regime."""
    ref, ours = _pair(DEV)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    kw = _inputs(DEV, 2, 6, 6)
    kw = {k: v.to(torch.bfloat16) if k != "img_ids" else v for k, v in kw.items()}
    with torch.no_grad():
        _close(ref(**kw, return_dict=False)[0].float(), ours(**kw).float(), rel=2e-2)


def test_state_dict_keys_and_shapes_match_diffusers() -> None:
    for cfg in CONFIGS.values():
        ref, ours = _pair(cfg)
        theirs = {k: v.shape for k, v in ref.state_dict().items()}
        assert {k: v.shape for k, v in ours.state_dict().items()} == theirs


def test_rope_matches_diffusers() -> None:
    """Tables equal FluxPosEmbed's (which are interleaved per channel pair) to 1e-6, and the
    rotation of q equals apply_rotary_emb's."""
    axes = (16, 56, 56)  # FLUX.1's
    ids = torch.cat(
        [torch.zeros(7, 3), FluxPipeline._prepare_latent_image_ids(1, 64, 48, "cpu", torch.float32)]
    )
    cos_ref, sin_ref = FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)  # (L, 128)
    table = rope_table(ids, axes, ROPE_THETA)  # (L, 64) complex: cos + i sin
    for mine, theirs in ((table.real, cos_ref), (table.imag, sin_ref)):
        assert torch.allclose(mine, theirs[:, 0::2], rtol=0, atol=1e-6)
        assert torch.allclose(mine, theirs[:, 1::2], rtol=0, atol=1e-6)
    q = torch.randn(2, 3, len(ids), 128)  # (B, heads, L, d)
    expected = apply_rotary_emb(q.transpose(1, 2), (cos_ref, sin_ref), sequence_dim=1)
    assert torch.allclose(apply_rope(q, table), expected.transpose(1, 2), rtol=0, atol=1e-6)


def test_packing_matches_diffusers_and_round_trips() -> None:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 6, 10, generator=gen)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    # diffusers' _unpack_latents takes the pixel size and rounds it itself: 48 x 80 px
    assert torch.equal(
        unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 48, 80, 8)
    )
    assert torch.equal(
        image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    )
    assert torch.equal(text_ids(4), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 5, 4))


@pytest.mark.parametrize("height, width", [(1024, 1024), (1000, 520), (31, 47), (16, 8)])
def test_latent_size_rounds_as_diffusers(height: int, width: int) -> None:
    """diffusers' prepare_latents: 2 * (px // 16); _unpack_latents reads the same rounding."""
    h, w = latent_size(height, width)
    assert (h, w) == (2 * (height // 16), 2 * (width // 16))
    if h and w:
        packed = torch.zeros(1, (h // 2) * (w // 2), 64)
        assert FluxPipeline._unpack_latents(packed, height, width, 8).shape[-2:] == (h, w)


@pytest.mark.parametrize("name", ["dev", "depth"])
def test_packed_flux_equals_diffusers_on_packed_latents(name: str) -> None:
    """Image-shaped in and out; extra channels concatenated before packing equal diffusers'
    concatenation of packed tensors (FluxControlPipeline's control latents)."""
    cfg = CONFIGS[name]
    ref, ours = _pair(cfg)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, cfg["in_channels"] // 4, 6, 8, generator=gen)
    context, pooled = torch.randn(2, 5, 12, generator=gen), torch.randn(2, 10, generator=gen)
    t, g = torch.tensor([0.9, 0.2]), torch.tensor([3.5, 4.0])
    with torch.no_grad():
        mine = PackedFlux(ours)(
            x, t, encoder_hidden_states=context, pooled_projections=pooled, guidance=g
        )
        packed = torch.cat(
            [FluxPipeline._pack_latents(part, 2, 4, 6, 8) for part in x.split(4, dim=1)], dim=2
        )
        ids = _diffusers_ids(3, 4)
        theirs = ref(packed, context, pooled, t, ids, torch.zeros(5, 3), g, return_dict=False)[0]
    _close(FluxPipeline._unpack_latents(theirs, 48, 64, 8), mine)
    assert mine.shape == (2, 4, 6, 8)  # out_channels 16 = 4 latent channels x 2 x 2
    with pytest.raises(ValueError, match="channels"):
        PackedFlux(ours)(
            x[:, :3], t, encoder_hidden_states=context, pooled_projections=pooled, guidance=g
        )


def test_denoiser_drives_packed_flux() -> None:
    """Denoiser(PackedFlux) with Flow(timestep_scale=1): D = x - sigma v with v from diffusers."""
    ref, ours = _pair(SCHNELL)
    denoiser = Denoiser(PackedFlux(ours), None, prediction=Flow(timestep_scale=1.0))
    assert denoiser.takes_pooled
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 4, 6, generator=gen)
    cond = Cond(
        context=torch.randn(2, 5, 12, generator=gen), pooled=torch.randn(2, 10, generator=gen)
    )
    sigma = torch.tensor([0.75, 0.3])
    with torch.no_grad():
        denoised = denoiser(x, sigma, cond)
        packed = FluxPipeline._pack_latents(x, 2, 4, 4, 6)
        ids, txt = _diffusers_ids(2, 3), torch.zeros(5, 3)
        v = ref(packed, cond.context, cond.pooled, sigma, ids, txt, return_dict=False)[0]
    _close(x - sigma[:, None, None, None] * FluxPipeline._unpack_latents(v, 32, 48, 8), denoised)


def test_gradient_checkpointing_same_gradients() -> None:
    _, ours = _pair(DEV)
    kw = _inputs(DEV, 2, 4, 4)
    grads = []
    for enabled in (False, True):
        ours.zero_grad()
        ours.enable_gradient_checkpointing(enabled)
        ours(**kw).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_magic": True}, "unknown field 'use_magic'"),
        ({"patch_size": 2}, "patch_size=2"),
        ({"axes_dims_rope": [4, 6, 4]}, "axes_dims_rope"),
        ({"axes_dims_rope": [5, 5, 6]}, "even"),
        ({"out_channels": 18}, "out_channels"),
    ],
)
def test_config_refused_by_name(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FluxConfig.from_diffusers({"_class_name": "FluxTransformer2DModel", **SCHNELL, **change})


def test_config_round_trips_through_diffusers() -> None:
    cfg = FluxConfig.from_diffusers({"_diffusers_version": "0.30.0", **DEV, "out_channels": None})
    assert cfg.out_channels == 16 and cfg.axes_dims_rope == (4, 6, 6)
    ref = DiffusersFlux.from_config(cfg.to_diffusers())
    assert FluxConfig.from_diffusers(dict(ref.config)) == cfg
    defaults = inspect.signature(DiffusersFlux.__init__).parameters
    theirs = {k: p.default for k, p in defaults.items() if k != "self"}
    assert FluxConfig.from_diffusers(theirs) == FluxConfig()  # the same class defaults
