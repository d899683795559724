"""The shared setup of the SD3 LoRA tests (test_sd3_lora.py, test_sd3_lora_kohya.py): a tiny
3.5-medium-shaped folder (a dual-attention block, RMS q/k norm, 2 blocks, so the last block's
context_pre_only modules are covered too), a LoRA file made by peft and
``StableDiffusion3Pipeline.save_lora_weights`` on it, and diffusers' load + fuse as the reference.
"""

from __future__ import annotations

import pytest
import torch
from tiny_sd3 import make_tiny_sd3

RANK, ALPHA = 4, 8.0  # alpha != rank: every reader must apply alpha / rank = 2
PARTS = ("unet", "text_encoder", "text_encoder_2")  # ldm's names; diffusers': transformer, ...
# every Linear / Conv2d of diffusers' SD3Transformer2DModel, by peft's suffix rule
TRANSFORMER_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "net.0.proj", "net.2", "linear", "linear_1", "linear_2", "context_embedder", "proj_out",
    "pos_embed.proj",
]  # fmt: skip
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
SHAPE = dict(dual_attention_layers=(0,), qk_norm="rms_norm")  # 3.5-medium-shaped


@pytest.fixture(scope="module", name="folder")
def folder_fixture(tmp_path_factory):
    return make_tiny_sd3(tmp_path_factory.mktemp("sd35_lora"), seed=4, transformer=SHAPE)


def _randomised(model, targets: list[str], seed: int) -> tuple[dict, dict]:
    """peft's adapter on ``model`` with random (small) lora_B: its state dict and config."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets)
    inject_adapter_in_model(config, model)
    state = get_peft_model_state_dict(model)
    gen = torch.Generator().manual_seed(seed)
    for key, value in state.items():  # peft zeroes lora_B: a random update instead
        fan_in = value[0].numel()
        size = 0.5 / fan_in**0.5 if ".lora_B." in key else 1.0 / fan_in**0.5
        state[key] = size * torch.randn(value.shape, generator=gen)
    return state, config.to_dict()


@pytest.fixture(scope="module", name="peft_file")
def peft_file_fixture(folder, tmp_path_factory):
    """What a diffusers SD3 LoRA script writes: transformer + both CLIPs, alpha in metadata."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    layers, meta = {}, {}
    for i, (part, targets) in enumerate(
        [("transformer", TRANSFORMER_TARGETS), ("text_encoder", CLIP_TARGETS),
         ("text_encoder_2", CLIP_TARGETS)]
    ):  # fmt: skip
        layers[f"{part}_lora_layers"], config = _randomised(getattr(pipe, part), targets, i)
        meta[f"{part}_lora_adapter_metadata"] = config
    out = tmp_path_factory.mktemp("peft")
    StableDiffusion3Pipeline.save_lora_weights(out, **layers, **meta)
    return out / "pytorch_lora_weights.safetensors"


def _diffusers_fused(folder, lora_file) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers loads and fuses ``lora_file``: state dicts under ldm's part names."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(lora_file))
    components = ["transformer", "text_encoder", "text_encoder_2"]
    pipe.fuse_lora(components=components, lora_scale=1.0)
    pipe.unload_lora_weights()
    return {ours: getattr(pipe, theirs).state_dict() for ours, theirs in zip(PARTS, components)}


def _assert_same(parts, reference: dict, base) -> int:
    """Every tensor of ldm's parts equals the reference; returns how many the LoRA moved."""
    moved = 0
    for part in PARTS:
        mine, before = getattr(parts, part).state_dict(), getattr(base, part).state_dict()
        assert mine.keys() == reference[part].keys()
        for key, value in mine.items():
            torch.testing.assert_close(value, reference[part][key], rtol=1e-5, atol=1e-6, msg=key)
            moved += not torch.equal(value, before[key])
    return moved
