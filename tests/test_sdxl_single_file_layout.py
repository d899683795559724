"""SDXL original single files at the real models' sizes (meta device): the public layout.

diffusers' ``infer_diffusers_model_type`` recognises a full-size export as SDXL base / refiner and
its converters read every tensor of it back; ldm infers the published configs from the keys;
open_clip's own text tower gives the bigG features ldm computes. The tiny files' load / save /
convert round trips are in test_sdxl_single_file.py.
"""

from __future__ import annotations

import pytest
import torch
from tiny_xl import BASE_PREFIXES, REFINER_PREFIX, _bare

from ldm.formats.original_config import (
    check_guesses,
    infer_text_config,
    infer_unet_config,
    infer_vae_config,
)
from ldm.formats.original_text import LOGIT_SCALE, openclip_from_original
from ldm.formats.single_file import to_original_state_dict
from ldm.models import families


def _real_configs(refiner: bool) -> dict:
    """stabilityai/stable-diffusion-xl-{base,refiner}-1.0 component configs (the fields that
    shape the weights), written from the published config.json files."""
    unet = dict(
        block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
        transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        projection_class_embeddings_input_dim=2816, layers_per_block=2, in_channels=4,
        out_channels=4, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, sample_size=128,
    )  # fmt: skip
    if refiner:
        unet.update(
            block_out_channels=[384, 768, 1536, 1536], attention_head_dim=[6, 12, 24, 24],
            transformer_layers_per_block=4, cross_attention_dim=1280,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                              "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            projection_class_embeddings_input_dim=2560,
        )  # fmt: skip
    big_g = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                 num_hidden_layers=32, projection_dim=1280, hidden_act="gelu")  # fmt: skip
    clip_l = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                  num_hidden_layers=12, hidden_act="quick_gelu")  # fmt: skip
    vae = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
               down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4)  # fmt: skip
    out = dict(unet=unet, vae=vae, text_encoder_2=big_g)
    if not refiner:
        out["text_encoder"] = clip_l
    return out


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner"])
def test_full_size_files_have_the_public_layout(family):
    """Real SDXL shapes on the meta device (no memory): ldm's export is what diffusers calls an
    SDXL base / refiner file, diffusers' converters read every tensor of it back, and ldm infers
    the published configs from the keys alone."""
    import diffusers.loaders.single_file_utils as su
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm.models.build import build_network, build_vae
    from ldm.models.parts import ModelParts

    real = _real_configs(refiner=family == "sdxl-refiner")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**real["unet"])
        vae = AutoencoderKL(**real["vae"])
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(**real["text_encoder_2"]))
        texts = {"text_encoder_2": big_g}
        if "text_encoder" in real:
            texts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**real["text_encoder"]))
    parts = ModelParts(
        build_network(dict(unet.config), family=family, empty=True),
        build_vae(dict(vae.config), empty=True), texts.get("text_encoder"), None, {},
        family=families.get(family), text_encoder_2=texts["text_encoder_2"],
    )  # fmt: skip
    original = to_original_state_dict(parts)
    assert families.from_keys(original, "f").name == family
    assert su.infer_diffusers_model_type(original) == {"sdxl": "xl_base"}.get(family, "xl_refiner")
    prefix = BASE_PREFIXES[1] if family == "sdxl" else REFINER_PREFIX
    assert original[prefix + "logit_scale"].item() == pytest.approx(LOGIT_SCALE)
    if family == "sdxl":
        assert su.CHECKPOINT_KEY_NAMES["clip_sdxl"] in original
        assert original[BASE_PREFIXES[0] + "text_model.embeddings.position_ids"].shape == (1, 77)
    read = {
        "unet": su.convert_ldm_unet_checkpoint(dict(original), dict(unet.config)),
        "vae": su.convert_ldm_vae_checkpoint(dict(original), dict(vae.config)),
        "text_encoder_2": su.convert_open_clip_checkpoint(
            texts["text_encoder_2"], original, prefix
        ),
    }
    if family == "sdxl":
        read["text_encoder"] = su.convert_ldm_clip_checkpoint(dict(original))
    for part, module in (("unet", unet), ("vae", vae), *texts.items()):
        want = {k: v.shape for k, v in _bare(module.state_dict()).items()}
        assert {k: v.shape for k, v in _bare(read[part]).items()} == want, part

    def sub(p):
        return {k[len(p) :]: v for k, v in original.items() if k.startswith(p)}

    inferred, _ = infer_unet_config(sub("model.diffusion_model."), family, pooled_dim=1280)
    for key, want in real["unet"].items():
        assert inferred[key] == want, key
    vae_config = infer_vae_config(sub("first_stage_model."), family)
    for key, want in real["vae"].items():
        assert vae_config[key] == want, key
    text_configs = []
    for part, prefix_ in zip(texts, (prefix, BASE_PREFIXES[0])):
        layout = "openclip" if part == "text_encoder_2" else "clip"
        state = _bare(texts[part].state_dict())
        n = real[part]["num_hidden_layers"]
        if layout == "openclip":
            state = openclip_from_original(original, n, prefix_, projection=True)
        text_configs.append(infer_text_config(state, family, n, part, layout))
        for key, want in real[part].items():
            assert text_configs[-1][key] == want, (part, key)
    check_guesses(inferred, vae_config, text_configs, "real")


def test_openclip_big_g_matches_open_clip():
    """bigG through ldm's names = open_clip's own tower: penultimate tokens (SDXL's context) and
    the projected pooled output (x @ text_projection), with a non-square projection."""
    from open_clip.transformer import TextTransformer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ldm.formats.diffusers_folder import fit_clip_keys
    from ldm.formats.safe_load import load_into

    torch.manual_seed(0)
    tower = TextTransformer(width=48, heads=4, layers=3, output_dim=40).eval()
    for p in tower.parameters():  # open_clip zero-inits some weights; make every one count
        p.data.normal_(0, 0.2)
    original = {BASE_PREFIXES[1] + k: v for k, v in tower.state_dict().items()}
    state = openclip_from_original(original, 3, BASE_PREFIXES[1], projection=True)
    config = infer_text_config(state, "sdxl", 3, "text_encoder_2", "openclip")
    model = CLIPTextModelWithProjection(CLIPTextConfig(**{**config, "num_attention_heads": 4}))
    load_into(model.eval(), fit_clip_keys(state, model), "bigG")
    ids = torch.randint(1, 49406, (2, 77))
    ids[:, 0], ids[0, 9], ids[1, 30] = 49406, 49407, 49407  # BOS ... EOS (the largest id)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        x = tower.token_embedding(ids) + tower.positional_embedding
        for block in tower.transformer.resblocks[:-1]:
            x = block(x, attn_mask=tower.attn_mask)
        pooled = tower(ids)
    assert (out.hidden_states[-2] - x).abs().max() < 1e-5
    assert (out.text_embeds - pooled).abs().max() < 1e-5
