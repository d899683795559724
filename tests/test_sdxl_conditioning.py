"""SDXL's conditioning against diffusers/transformers on identical tiny random weights.

The U-Net's text_time conditioning; both text encoders (context side by side, pooled from the
second) with clip skip, A1111 emphasis per encoder and 77-token chunks; micro-conditioning ids
and the empty negative as zeros; the sampling defaults a checkpoint's family and scheduler give;
the VAE's fp32 decode. The images themselves are in test_sdxl_pipeline.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sdxl_pipeline_helpers import PROMPT, SEED, SIZE, _array, ours_fixture, theirs_fixture  # noqa: F401 (fixtures)

from ldm.pipeline import load_pipeline
from ldm.text.micro import MicroConditioning, time_ids


def test_defaults_come_from_the_family_and_the_checkpoint(ours):
    pipe = ours()
    assert pipe.parts.family.name == "sdxl"
    assert pipe.sampling_defaults == dict(
        sampler="euler", schedule="default", steps=30, guidance_scale=5.0
    )
    assert pipe.default_size == (16, 16)  # sample_size 8 x factor 2 (1024 for the real one)
    assert pipe.force_zeros_for_empty_prompt


def test_empty_negative_is_zeros_only_with_force_zeros(ours):
    pipe = ours()
    r = pipe.prepare([PROMPT, PROMPT], [1, 2], negative_prompt=["", "x"], height=SIZE, width=SIZE)
    cond, uncond = pipe.encode_text(r.prompts, r.negatives, 1, True)
    cond, uncond = pipe.condition(r, cond, uncond)
    assert not uncond.context[0].any() and not uncond.pooled[0].any()
    assert uncond.context[1].abs().sum() > 0 and uncond.pooled[1].abs().sum() > 0
    assert torch.equal(cond.time_ids, torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))


def test_micro_conditioning_changes_the_image_and_negatives_default_to_positives(ours):
    pipe = ours()
    kwargs = dict(steps=2, height=SIZE, width=SIZE, sampler="euler")
    (plain,) = pipe([PROMPT], [SEED], **kwargs)
    micro = MicroConditioning(original_size=(SIZE, SIZE), target_size=(SIZE, SIZE))
    (same,) = pipe([PROMPT], [SEED], micro=micro, **kwargs)
    assert np.array_equal(_array(plain.image), _array(same.image))
    cropped = MicroConditioning(crops_coords_top_left=(256, 0), original_size=(2048, 2048))
    (other,) = pipe([PROMPT], [SEED], micro=cropped, **kwargs)
    assert np.abs(_array(other.image) - _array(plain.image)).max() > 0
    positive, negative = cropped.ids("size", SIZE, SIZE)
    assert torch.equal(positive, negative)
    assert torch.equal(positive, time_ids("size", (2048, 2048), (256, 0), (SIZE, SIZE)))


def test_unet_text_time_matches_diffusers(tiny_sdxl):
    from diffusers import UNet2DConditionModel as Theirs

    theirs = Theirs.from_pretrained(tiny_sdxl, subfolder="unet").eval()
    ours = load_pipeline(str(tiny_sdxl), "cpu", "fp32", accel="off").unet
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0])
    context, pooled = torch.randn(2, 7, 64), torch.randn(2, 32)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512, 768, 32, 16, 1024, 1024]])
    added = {"text_embeds": pooled, "time_ids": ids}
    with torch.no_grad():
        expected = theirs(x, t, context, added_cond_kwargs=added).sample
        got = ours(x, t, context, added_cond_kwargs=added)
        other = ours(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids * 0})
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (other - got).abs().max() > 1e-3  # the ids do reach the output


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_text_encoders_match_diffusers(clip_skip, ours, theirs):
    """Context = both encoders' penultimate states side by side; pooled = the second's."""
    pipe, ref = ours(), theirs()
    prompts = [PROMPT, "two (green:1.0) triangles"]
    context, _, pooled, _ = ref.encode_prompt(
        prompts, do_classifier_free_guidance=False, clip_skip=clip_skip - 1 or None
    )
    cond = pipe.text_encoder(clip_skip).encode(prompts)
    assert cond.context.shape == context.shape == (2, 77, 64)
    assert (cond.context - context).abs().max() <= 1e-5 * context.abs().max()
    assert (cond.pooled - pooled).abs().max() <= 1e-5 * pooled.abs().max()


def test_emphasis_weights_each_encoder_on_its_own(ours):
    """A1111 restores each embedder's mean separately; a shared mean would mix 768 and 1280."""
    from ldm.text.prompts import encode_prompts

    encoder = ours().text_encoder(1)
    plain = encode_prompts(encoder, ["a red circle"]).context
    weighted = encode_prompts(encoder, ["a (red:1.5) circle"]).context
    widths = encoder.widths
    for p, w in zip(plain.split(widths, -1), weighted.split(widths, -1)):
        assert torch.allclose(p.mean(), w.mean(), atol=1e-5)  # each part's mean is kept
        assert (p - w).abs().max() > 1e-3


def test_the_checkpoint_scheduler_picks_the_default_sampler(tiny_sdxl, tmp_path):
    import json
    import shutil

    from ldm.sampling.samplers import from_scheduler_config

    folder = shutil.copytree(tiny_sdxl, tmp_path / "dpm")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(_class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True)
    config_path.write_text(json.dumps(config))
    pipe = load_pipeline(str(folder), "cpu", "fp32", accel="off")
    assert pipe.sampling_defaults["sampler"] == "dpmpp_2m"
    assert pipe.sampling_defaults["schedule"] == "karras"
    sde = dict(config, algorithm_type="sde-dpmsolver++", use_karras_sigmas=False)
    assert from_scheduler_config(sde) == ("dpmpp_2m_sde", "default")
    assert from_scheduler_config(dict(config, _class_name="PNDMScheduler")) is None
    assert from_scheduler_config(dict(config, solver_order=3)) is None


def test_fp16_decodes_in_fp32_where_the_vae_asks(ours, tiny_sd1):
    pipe = ours()
    pipe.dtype = torch.float16  # only the choice is checked: fp16 convolutions are slow on CPUs
    try:
        vae, where = pipe._vae_for_pixels()
        assert where["dtype"] == torch.float32
        assert next(vae.parameters()).dtype == torch.float32
    finally:
        pipe.dtype = torch.float32
    sd1 = load_pipeline(str(tiny_sd1), "cpu", "fp32", accel="off")
    sd1.dtype = torch.float16  # SD 1.x pipelines (as diffusers') do not upcast
    assert sd1._vae_for_pixels()[1]["dtype"] == torch.float16


def test_long_prompts_and_break_chunk_both_encoders_pooled_from_the_first(ours):
    from ldm.text.prompts import encode_prompts

    encoder = ours().text_encoder(1)
    first = "a red circle above a blue square"
    cond = encode_prompts(encoder, [f"{first} BREAK two green triangles"])
    assert cond.context.shape == (1, 154, 64)  # two 77-token chunks, 32 + 32 features each
    alone = encoder.encode([first])
    assert torch.allclose(cond.pooled, alone.pooled, atol=1e-6)  # A1111: the first chunk's
    assert torch.allclose(cond.context[:, :77], alone.context, atol=1e-6)
    second = encoder.encode(["two green triangles"])
    assert torch.allclose(cond.context[:, 77:], second.context, atol=1e-6)
    long = encode_prompts(encoder, [", ".join(["a red circle"] * 40)])
    assert long.context.shape[1] == 77 * 3  # 120 + 39 tokens: nothing truncated
