"""LoRA: peft training adapters, diffusers/kohya files, merging; diffusers' loader as reference."""

from __future__ import annotations

import pytest
import torch

from ldm.errors import CheckpointError, ConfigError
from ldm.formats.diffusers_folder import load_folder
from ldm.formats.lora import apply_lora, load_lora, parse_lora_arg
from ldm.formats.safe_load import load_state_dict, save_state_dict
from ldm.train.config import LoRAConfig
from ldm.train.lora import add_lora, lora_layers, merge_lora, save_lora

ATTN = "down_blocks.0.attentions.0"
Q = f"{ATTN}.transformer_blocks.0.attn1.to_q"


def _inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 7, 32, generator=gen)
    tokens = torch.randint(0, 1000, (2, 7), generator=gen)
    return x, torch.tensor([10.0, 731.0]), context, tokens


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    scale = a.abs().max().item()
    assert scale > 0.1
    assert (a - b).abs().max().item() <= rel * scale


def _randomize_lora(module: torch.nn.Module, seed: int) -> None:
    """lora_B starts at zero; give it values so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(module).values():
            up = layer.lora_B["default"].weight
            up.copy_(0.2 * torch.randn(up.shape, generator=gen))


@pytest.fixture(scope="module")
def trained(tiny_sd1, tmp_path_factory):
    """tiny_sd1 with LoRA (rank 4, alpha 8: scale 2) on the U-Net and text encoder, saved."""
    parts = load_folder(tiny_sd1)
    config = LoRAConfig(rank=4, alpha=8.0, text_encoder=True)
    add_lora(parts.unet, "unet", config)
    add_lora(parts.text_encoder, "text_encoder", config)
    _randomize_lora(parts.unet, 0)
    _randomize_lora(parts.text_encoder, 1)
    x, t, context, tokens = _inputs()
    with torch.no_grad():
        outputs = parts.unet(x, t, context), parts.text_encoder(tokens).last_hidden_state
    files = save_lora(parts, tmp_path_factory.mktemp("lora"))
    return files, outputs


def test_add_lora_trains_only_lora_params(tiny_sd1):
    parts = load_folder(tiny_sd1)
    parts.unet.requires_grad_(True)  # add_lora must freeze the base whatever came before
    before = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    x, t, context, _ = _inputs()
    with torch.no_grad():
        reference = parts.unet(x, t, context)
    count = add_lora(parts.unet, "unet", LoRAConfig(rank=2, alpha=2.0))
    trainable = [n for n, p in parts.unet.named_parameters() if p.requires_grad]
    # 4 transformer blocks x 2 attentions x 4 projections, each with lora_A and lora_B
    assert len(trainable) == 64 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert count == sum(p.numel() for p in parts.unet.parameters() if p.requires_grad)
    with torch.no_grad():  # lora_B starts at zero: the adapted model is the base model
        assert torch.equal(parts.unet(x, t, context), reference)
    optimizer = torch.optim.AdamW([p for p in parts.unet.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = parts.unet(x, t, context).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = parts.unet.state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in after.items() if ".lora_" not in k}
    assert base.keys() == before.keys()
    assert all(torch.equal(base[k], before[k]) for k in before)
    changed = [k for k in after if ".lora_" in k and k.endswith("weight")]
    assert all(after[k].abs().max() > 0 for k in changed if ".lora_B." in k)
    with pytest.raises(ConfigError, match="lora.targets"):
        add_lora(parts.vae, "unet", LoRAConfig(targets=["no_such_proj"]))


def test_merge_equals_adapted_forward(tiny_sd1):
    parts = load_folder(tiny_sd1)
    names = set(parts.unet.state_dict())
    x, t, context, tokens = _inputs()
    with torch.no_grad():
        base = parts.unet(x, t, context)
    config = LoRAConfig(rank=3, alpha=5.0, targets=["to_q", "to_v", "ff.net.2", "proj_in"])
    add_lora(parts.unet, "unet", config)
    add_lora(parts.text_encoder, "text_encoder", config)
    _randomize_lora(parts.unet, 2)
    _randomize_lora(parts.text_encoder, 3)
    with torch.no_grad():
        adapted = parts.unet(x, t, context), parts.text_encoder(tokens).last_hidden_state
        # 4 blocks x (attn1, attn2) x (q, v), ff.net.2 and proj_in (a 1x1 conv in SD 1.x)
        assert merge_lora(parts.unet) == 4 * 2 * 2 + 4 + 4
        assert merge_lora(parts.text_encoder) == 3 * 4  # default q, k, v, out_proj
        merged = parts.unet(x, t, context), parts.text_encoder(tokens).last_hidden_state
    assert set(parts.unet.state_dict()) == names and not lora_layers(parts.unet)
    _close(adapted[0], merged[0])
    _close(adapted[1], merged[1])
    assert not torch.allclose(base, merged[0], atol=1e-3)  # the LoRA did change the model


def test_saved_lora_matches_diffusers_loader(tiny_sd1, trained):
    from diffusers import StableDiffusionPipeline

    (diffusers_file, kohya_file), (unet_out, text_out) = trained
    assert diffusers_file.name == "pytorch_lora_weights.safetensors"
    keys = load_state_dict(diffusers_file)
    assert f"unet.{Q}.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    kohya = load_state_dict(kohya_file)
    stem = "lora_unet_" + Q.replace(".", "_")
    assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= set(kohya)
    assert float(kohya[f"{stem}.alpha"]) == 8.0
    assert "lora_te_text_model_encoder_layers_2_self_attn_out_proj.alpha" in kohya

    x, t, context, tokens = _inputs()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    for path in (diffusers_file, kohya_file):  # diffusers converts the kohya file itself
        pipe.load_lora_weights(str(path))
        with torch.no_grad():
            ref_unet = pipe.unet(x, t, context).sample
            ref_text = pipe.text_encoder(tokens).last_hidden_state
        pipe.unload_lora_weights()
        _close(ref_unet, unet_out)
        _close(ref_text, text_out)
        parts = load_folder(tiny_sd1)
        report = apply_lora(parts, path)
        assert len(report.matched) == 32 + 12 and report.warning() is None
        with torch.no_grad():
            _close(ref_unet, parts.unet(x, t, context))
            _close(ref_text, parts.text_encoder(tokens).last_hidden_state)
    assert load_lora(kohya_file).format == "kohya"
    assert load_lora(diffusers_file).format == "diffusers"


def test_scale_unmatched_keys_and_conv(tiny_sd1, tmp_path):
    parts = load_folder(tiny_sd1)
    gen = torch.Generator().manual_seed(4)
    proj_in = parts.unet.get_submodule(f"{ATTN}.proj_in").weight  # 1x1 conv [32, 32, 1, 1]
    q = parts.unet.get_submodule(Q).weight
    out = parts.unet.get_submodule(Q.replace("to_q", "to_out.0")).weight
    before_conv, before_q, before_out = proj_in.clone(), q.clone(), out.clone()
    down, up = torch.randn(2, 32, 1, 1, generator=gen), torch.randn(32, 2, 1, 1, generator=gen)
    qd, qu = torch.randn(2, 32, generator=gen), torch.randn(32, 2, generator=gen)
    conv_stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    q_stem = "lora_unet_" + Q.replace(".", "_").replace("to_q", "to_out_0")  # kohya's to_out_0
    state = {
        f"{conv_stem}.lora_down.weight": down,
        f"{conv_stem}.lora_up.weight": up,
        f"{conv_stem}.alpha": torch.tensor(1.0),  # scale alpha / rank = 0.5
        f"{q_stem}.lora_down.weight": qd,
        f"{q_stem}.lora_up.weight": qu,
        "lora_unet_input_blocks_9_1_proj_in.lora_down.weight": down,  # sgm name, no such block
        "lora_unet_input_blocks_9_1_proj_in.lora_up.weight": up,
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": qd,  # [64, 32] weight
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": qu,
        "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": qd,  # LoHa: not LoRA
    }
    path = tmp_path / "mixed.safetensors"
    save_state_dict(state, path)
    report = apply_lora(parts, path, scale=0.7)
    assert sorted(report.matched) == [
        f"unet.{ATTN}.proj_in",
        "unet." + Q.replace("to_q", "to_out.0"),
    ]
    assert report.unmatched == [
        "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a",
        "lora_unet_input_blocks_9_1_proj_in.lora_down.weight",
        "lora_unet_input_blocks_9_1_proj_in.lora_up.weight",
    ]
    assert len(report.mismatched) == 1 and "mlp_fc1" in report.mismatched[0]
    assert "3 keys matched nothing" in report.warning()
    assert (
        "and 1 pair did not fit its weight: " in report.warning()
        and "input_blocks_9_1" in report.warning()
    )
    expected = before_conv + 0.7 * 0.5 * (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
    torch.testing.assert_close(proj_in, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, before_out + 0.7 * qu @ qd, rtol=1e-6, atol=1e-6)
    assert torch.equal(q, before_q)


def test_bad_files_and_flag(tmp_path, tiny_sd1):
    with pytest.raises(CheckpointError, match="no LoRA weights"):
        load_lora(tiny_sd1 / "vae" / "diffusion_pytorch_model.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        load_lora(broken)
    bad_pair = tmp_path / "pair.safetensors"
    save_state_dict(
        {
            "lora_unet_x.lora_down.weight": torch.ones(2, 4),
            "lora_unet_x.lora_up.weight": torch.ones(4, 3),
        },
        bad_pair,
    )
    with pytest.raises(CheckpointError, match="low-rank pair"):
        load_lora(bad_pair)
    assert parse_lora_arg("style.safetensors:0.6")[1] == 0.6
    assert parse_lora_arg("C:/loras/a.safetensors") == (
        tmp_path.__class__("C:/loras/a.safetensors"),
        1.0,
    )


def test_reads_diffusers_trained_file_with_alpha_metadata(tiny_sd1, tmp_path):
    """A file written the way diffusers' train_text_to_image_lora.py writes it (alpha != rank)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_sd1 / "unet").eval()
    targets = ["to_k", "to_out.0"]
    torch.manual_seed(5)  # init_lora_weights=False: random lora_B, so the adapter acts
    unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    x, t, context, _ = _inputs()
    parts = load_folder(tiny_sd1)
    report = apply_lora(parts, tmp_path / "pytorch_lora_weights.safetensors")
    assert len(report.matched) == 4 * 2 * 2 and report.warning() is None
    with torch.no_grad():
        reference = unet(x, t, context).sample
        _close(reference, parts.unet(x, t, context))
        unet.disable_adapters()
        assert not torch.allclose(unet(x, t, context).sample, reference, atol=1e-3)
