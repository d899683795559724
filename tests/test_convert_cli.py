"""``ldm convert --to lora-kohya / lora-diffusers``: an SDXL LoRA between layouts, for a model."""

from __future__ import annotations

import torch

from ldm.formats.diffusers_folder import load_folder
from ldm.formats.lora import resolve_lora
from ldm.formats.safe_load import load_state_dict, save_state_dict


def _pair(stem: str, out_features: int, in_features: int, g, rank: int = 4) -> dict:
    return {
        f"{stem}.lora_down.weight": torch.randn(rank, in_features, generator=g),
        f"{stem}.lora_up.weight": torch.randn(out_features, rank, generator=g),
        f"{stem}.alpha": torch.tensor(2.0),  # scale alpha / rank = 0.5
    }


def _kohya_sdxl_lora(path, extra: dict | None = None):
    """kohya's SDXL names: sgm U-Net blocks, lora_te1_ (CLIP-L), lora_te2_ (bigG)."""
    g = torch.Generator().manual_seed(0)
    state_dict = {
        **_pair("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q", 64, 64, g),
        **_pair("lora_unet_middle_block_1_proj_in", 64, 64, g),
        **_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32, 32, g),
        **_pair("lora_te2_text_model_encoder_layers_1_mlp_fc1", 64, 32, g),
        **(extra or {}),
    }
    save_state_dict(state_dict, path)
    return path


def _deltas(parts, path) -> dict:
    resolved, report = resolve_lora(parts, path)
    assert report.warning() is None
    return {f"{pair.part}.{pair.name}": pair.delta() for pair, _ in resolved}


def test_sdxl_lora_kohya_to_diffusers_and_back(tiny_sdxl, tmp_path, capsys):
    from ldm.cli import main

    src = _kohya_sdxl_lora(tmp_path / "kohya.safetensors")
    peft, back = tmp_path / "peft.safetensors", tmp_path / "back.safetensors"
    model = ["--model", str(tiny_sdxl)]
    assert main(["convert", str(src), str(peft), "--to", "lora-diffusers", *model]) == 0
    assert main(["convert", str(peft), str(back), "--to", "lora-kohya", *model]) == 0
    assert "4 modules" in capsys.readouterr().out
    names = {k.rsplit(".lora_", 1)[0] for k in load_state_dict(peft)}
    assert names == {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.mid_block.attentions.0.proj_in",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc1",
    }
    assert set(load_state_dict(back)) == set(load_state_dict(src))
    parts = load_folder(tiny_sdxl)
    want = _deltas(parts, src)
    for path in (peft, back):  # every file moves every weight by the same ΔW
        got = _deltas(parts, path)
        assert set(got) == set(want)
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-7), k


def test_lora_convert_errors_are_one_line(tiny_sdxl, tmp_path, capsys):
    from ldm.cli import main

    bad = {"lora_unet_input_blocks_99_1_proj_in.lora_down.weight": torch.zeros(4, 64),
           "lora_unet_input_blocks_99_1_proj_in.lora_up.weight": torch.zeros(64, 4)}  # fmt: skip
    src = _kohya_sdxl_lora(tmp_path / "k.safetensors", bad)
    dst = tmp_path / "out.safetensors"
    cases = [
        (["--to", "lora-kohya"], "--model"),
        (["--to", "diffusers", "--model", str(tiny_sdxl)], "base model of a LoRA"),
        (["--to", "lora-diffusers", "--model", str(tiny_sdxl)], "matched nothing"),
    ]
    for args, words in cases:
        target = tmp_path / "f" if args[1] == "diffusers" else dst
        assert main(["convert", str(src), str(target), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ldm: error:") and words in err and "\n" not in err, err
    assert not dst.exists() and not (tmp_path / "f").exists()


def test_convert_keeps_the_source_dtype(tiny_sdxl, tmp_path, capsys):
    """An fp16 folder becomes an fp16 file and an fp16 folder again, tensor for tensor (fp32 in
    between holds fp16 exactly); --dtype still chooses."""
    from ldm.cli import main
    from ldm.formats.diffusers_folder import save_folder
    from ldm.formats.safe_load import read_safetensors_header

    half = save_folder(load_folder(tiny_sdxl), tmp_path / "half", dtype="fp16")
    single, back = tmp_path / "m.safetensors", tmp_path / "back"
    assert main(["convert", str(half), str(single), "--to", "single-file"]) == 0
    assert main(["convert", str(single), str(back), "--to", "diffusers"]) == 0
    assert "fp16" in capsys.readouterr().out
    header = read_safetensors_header(single)
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16", "I64"}
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for f in (half / part).glob("*.safetensors"):
            ours, ref = load_state_dict(back / part / f.name), load_state_dict(f)
            assert ours.keys() == ref.keys()
            assert all(ours[k].dtype == torch.float16 and torch.equal(ours[k], ref[k]) for k in ref)
    assert main(["convert", str(half), str(tmp_path / "f.safetensors"), "--to", "single-file",
                 "--dtype", "fp32"]) == 0  # fmt: skip
    assert (
        load_state_dict(tmp_path / "f.safetensors")["first_stage_model.quant_conv.bias"].dtype
        == torch.float32
    )


def test_stored_dtype_ignores_stray_scalars(tmp_path):
    from ldm.cli.convert import stored_dtype

    half = {"w": torch.zeros(1000, dtype=torch.float16), "ids": torch.arange(77)}
    cases = [
        ({**half, "logit_scale": torch.tensor(4.6)}, "fp16"),  # OpenCLIP's fp32 scalar
        ({**half, "vae": torch.zeros(100)}, None),  # a real fp32 part: mixed, written as fp32
        ({"w": torch.zeros(10, dtype=torch.bfloat16)}, "bf16"),
    ]
    for i, (state_dict, want) in enumerate(cases):
        save_state_dict(state_dict, tmp_path / f"{i}.safetensors")
        assert stored_dtype(tmp_path / f"{i}.safetensors") == want, i
    assert stored_dtype(tmp_path) is None  # a folder of all three: mixed
