"""FLUX.1's memory by part, counted from the real configs (docs/flux.md's table).

Builds FLUX.1-dev's (or schnell's) transformer, VAE, CLIP-L and T5-XXL from
``ldm.models.family_configs.flux_single_file`` on the meta device (no memory, no weights) and
counts parameters and buffers per part, with the bytes in bf16 and fp32, the largest module that
holds weights (what ``--offload sequential`` puts on the GPU at once) and the largest block.

    python scripts/flux_memory.py [--schnell] [--size 1024]
"""

from __future__ import annotations

import argparse

import torch

from ldm.models.build import build_network, build_text_encoder, build_vae
from ldm.models.family_configs import flux_single_file

GB, GIB = 1e9, 2**30


def parts(dev: bool) -> dict[str, torch.nn.Module]:
    """The four parts of FLUX.1, built on the meta device."""
    c = flux_single_file(dev)
    # what a single file's keys say about the VAE (FLUX.1's vae/config.json): 4 levels of 2
    levels = len(c["vae"]["block_out_channels"])
    vae = dict(c["vae"], in_channels=3, out_channels=3, layers_per_block=2,
               down_block_types=["DownEncoderBlock2D"] * levels,
               up_block_types=["UpDecoderBlock2D"] * levels)  # fmt: skip
    with torch.device("meta"):
        return {
            "transformer": build_network(c["transformer"], family="flux", empty=True),
            "T5-XXL (text_encoder_2)": build_text_encoder(c["text_encoder_2"], "T5EncoderModel"),
            "CLIP-L (text_encoder)": build_text_encoder(c["text_encoder"], "CLIPTextModel"),
            "VAE": build_vae(vae, empty=True),
        }


def count(module: torch.nn.Module, recurse: bool = True) -> int:
    """Parameters + buffers, each tied tensor once (T5's shared embedding)."""
    tensors = {id(t): t for t in (*module.parameters(recurse), *module.buffers(recurse))}
    return sum(t.numel() for t in tensors.values())


def largest_holder(module: torch.nn.Module) -> tuple[str, int]:
    """The module owning the most weights itself (sequential offload's unit)."""
    return max(
        ((n, count(m, recurse=False)) for n, m in module.named_modules()), key=lambda x: x[1]
    )


def block_sizes(transformer) -> dict[str, int]:
    return {
        "double-stream block": count(transformer.transformer_blocks[0]),
        "single-stream block": count(transformer.single_transformer_blocks[0]),
    }


def activation_estimate(size: int, width: int = 3072, text_tokens: int = 512) -> tuple[int, int]:
    """(tokens, bytes in bf16) of one single-stream block's live tensors at ``size`` pixels: its
    input, the fused qkv + MLP projection (3 x width + 4 x width) and the concatenation before
    proj_out (width + 4 x width) per token. A rough bound for planning, not a measurement."""
    tokens = text_tokens + (size // 16) ** 2  # 8x VAE, 2x2 packing
    return tokens, tokens * (width + 7 * width + 5 * width) * 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schnell", action="store_true", help="FLUX.1-schnell (default: dev)")
    p.add_argument("--size", type=int, default=1024, help="image side for the activation bound")
    args = p.parse_args()
    built = parts(dev=not args.schnell)
    print(f"FLUX.1-{'schnell' if args.schnell else 'dev'}")
    print("| part | parameters | bf16 GB | bf16 GiB | fp32 GB |")
    print("|---|---:|---:|---:|---:|")
    total = 0
    for name, module in built.items():
        n = count(module)
        total += n
        b16, b32 = 2 * n, 4 * n
        print(f"| {name} | {n / 1e9:.3f} B | {b16 / GB:.2f} | {b16 / GIB:.2f} | {b32 / GB:.2f} |")
    print(f"| all | {total / 1e9:.3f} B | {2 * total / GB:.2f} | {2 * total / GIB:.2f} | "
          f"{4 * total / GB:.2f} |")  # fmt: skip
    for name, module in built.items():
        unit, n = largest_holder(module)
        print(
            f"largest weight holder of {name}: {unit} {n / 1e6:.1f} M = {2 * n / 1e6:.0f} MB bf16"
        )
    for name, n in block_sizes(built["transformer"]).items():
        print(f"{name}: {n / 1e6:.1f} M = {2 * n / 1e6:.0f} MB bf16")
    tokens, nbytes = activation_estimate(args.size)
    print(f"one single-stream block's live tensors at {args.size}px ({tokens} tokens): "
          f"~{nbytes / 1e6:.0f} MB bf16 (estimate)")  # fmt: skip


if __name__ == "__main__":
    main()
