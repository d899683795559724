"""`ldm txt2img --lora FILE[:SCALE]` applies diffusers and kohya LoRA files."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm.cli import main


def _make_lora(folder, out_dir):
    from ldm.formats.diffusers_folder import load_folder
    from ldm.train.config import LoRAConfig
    from ldm.train.lora import add_lora, save_lora

    parts = load_folder(folder)
    add_lora(parts.unet, "unet", LoRAConfig(rank=4, alpha=4.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in parts.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a LoRA that really changes the output
    return save_lora(parts, out_dir)


def _txt2img(capsys, folder, out, *extra):
    code = main(["txt2img", "--model", str(folder), "--prompt", "a red circle", "--steps", "2",
                 "--H", "32", "--W", "32", "--seed", "3", "--outdir", str(out), "--no-progress",
                 *extra])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    path = captured.out.strip().splitlines()[-1]
    return np.asarray(Image.open(path)).astype(int), captured.err


def test_lora_flag_both_formats_and_scale(tiny_sd1, tmp_path, capsys):
    diffusers_file, kohya_file = _make_lora(tiny_sd1, tmp_path / "lora")
    base, _ = _txt2img(capsys, tiny_sd1, tmp_path / "a")
    zero, _ = _txt2img(capsys, tiny_sd1, tmp_path / "b", "--lora", f"{diffusers_file}:0")
    with_d, _ = _txt2img(capsys, tiny_sd1, tmp_path / "c", "--lora", f"{diffusers_file}:1.0")
    with_k, _ = _txt2img(capsys, tiny_sd1, tmp_path / "d", "--lora", str(kohya_file))
    assert np.array_equal(base, zero)
    assert np.abs(with_d - base).max() > 10
    assert np.abs(with_d - with_k).max() <= 2

    # a key that matches nothing is reported, never dropped silently
    sd = load_file(str(kohya_file))
    sd["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(4, 32)
    sd["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(32, 4)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    _, err = _txt2img(
        capsys, tiny_sd1, tmp_path / "e", "--lora", str(tmp_path / "extra.safetensors")
    )
    assert "matched nothing" in err and "no_such_block" in err


def test_missing_lora_file_is_one_line_error(tiny_sd1, tmp_path, capsys):
    code = main(["txt2img", "--model", str(tiny_sd1), "--prompt", "x", "--outdir", str(tmp_path),
                 "--lora", str(tmp_path / "nope.safetensors")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope.safetensors" in err[0]
    assert not any(tmp_path.iterdir())
