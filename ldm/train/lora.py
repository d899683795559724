"""LoRA fine-tuning (Hu et al. 2021): peft adapters on attention projections, export, merge.

``add_lora`` injects peft ``LoraLayer``s (lora_B starts at zero, so the model is unchanged at
step 0) into the U-Net's ``to_q/to_k/to_v/to_out.0`` (FLUX.1: diffusers' FLUX defaults,
FLUX_TARGETS) or the CLIP text encoder's ``q_proj/k_proj/v_proj/out_proj`` and leaves only their
weights trainable. ``save_lora`` writes
the trained pairs as diffusers/PEFT ``pytorch_lora_weights.safetensors`` and as a kohya file;
``merge_lora`` folds them into the base weights and removes the adapters, so a full export has
the original parameter names.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ldm.errors import ConfigError
from ldm.formats.lora import (
    DIFFUSERS_NAME,
    TEXT_MODEL,
    LoraModule,
    save_diffusers_lora,
    save_kohya_lora,
)
from ldm.formats.lora_flux import is_flux, save_flux_lora
from ldm.train.config import LoRAConfig

ADAPTER = "default"  # peft's adapter name; ldm trains one adapter at a time
KOHYA_NAME = "lora_kohya.safetensors"
LORA_PARTS = ("unet", "text_encoder", "text_encoder_2")  # SDXL's second: kohya lora_te2_
# FLUX.1's transformer when lora.targets is left at its (U-Net) default: diffusers'
# train_dreambooth_lora_flux --lora_layers default, both streams' attention and MLPs of the
# double blocks, q/k/v of the single blocks (kohya files fuse them with zero MLP-input rows)
FLUX_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]  # fmt: skip


def add_lora(module: torch.nn.Module, name: str, config: LoRAConfig) -> int:
    """Inject LoRA into ``module`` (a part of LORA_PARTS); return the trainable count."""
    from peft import LoraConfig, inject_adapter_in_model

    if name not in LORA_PARTS:
        raise ConfigError(f"lora: cannot add LoRA to '{name}' (only {', '.join(LORA_PARTS)})")
    targets = list(config.targets if name == "unet" else config.text_encoder_targets)
    if name == "unet" and is_flux(module.config) and targets == LoRAConfig().targets:
        targets = list(FLUX_TARGETS)
    where = "lora.targets" if name == "unet" else "lora.text_encoder_targets"
    if config.rank < 1 or not config.alpha > 0:
        raise ConfigError(
            f"lora: rank must be >= 1 and alpha > 0, got {config.rank}, {config.alpha}"
        )
    if not targets:
        raise ConfigError(f"{where}: empty list")
    if lora_layers(module):
        raise ConfigError(f"lora: the {name} already has LoRA layers (merge_lora first)")
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets)
    try:
        inject_adapter_in_model(peft_config, module, adapter_name=ADAPTER)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(
            f"{where}: {targets} name no Linear/Conv2d layer of the {name} "
            f"({str(e).splitlines()[0][:120]})"
        ) from None
    trainable = 0
    for param_name, param in module.named_parameters():
        # the base weights stay frozen whatever requires_grad they had before
        param.requires_grad_(
            f".lora_A.{ADAPTER}." in param_name or f".lora_B.{ADAPTER}." in param_name
        )
        trainable += param.numel() if param.requires_grad else 0
    return trainable


def lora_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The peft LoRA layers of ``module`` by module path (the path of the layer they wrap)."""
    from peft.tuners.lora import LoraLayer

    return {
        name: layer
        for name, layer in module.named_modules()
        if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A
    }


def lora_modules(module: torch.nn.Module, part: str) -> list[LoraModule]:
    """The trained pairs of ``module`` as ``LoraModule``s (detached), ready for the writers."""
    pairs = []
    for name, layer in lora_layers(module).items():
        down = layer.lora_A[ADAPTER].weight.detach()
        up = layer.lora_B[ADAPTER].weight.detach()
        # peft's scaling is alpha / rank (alpha / sqrt(rank) with rsLoRA): recover the kohya alpha
        alpha = float(layer.scaling[ADAPTER]) * down.shape[0]
        pairs.append(LoraModule(part, name.removeprefix(TEXT_MODEL), down, up, alpha))
    return pairs


def save_lora(
    parts,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    kohya_name: str = KOHYA_NAME,
) -> list[Path]:
    """Write the LoRA of parts.unet / text encoders as diffusers/PEFT and kohya files (FLUX.1:
    ``transformer.*`` and kohya's BFL names, ldm.formats.lora_flux)."""
    modules = []
    for part in LORA_PARTS:
        if (module := getattr(parts, part, None)) is not None:
            modules += lora_modules(module, part)
    if not modules:
        raise ValueError("save_lora: the model has no LoRA layers (add_lora was not called)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_flux(parts.unet.config):  # FLUX.1: ``transformer.*`` pairs; kohya's BFL names, fused
        return [
            save_flux_lora(
                modules, out_dir / DIFFUSERS_NAME, parts.unet.config, "diffusers", dtype
            ),
            save_flux_lora(modules, out_dir / kohya_name, parts.unet.config, "kohya", dtype),
        ]
    return [
        save_diffusers_lora(modules, out_dir / DIFFUSERS_NAME, dtype),
        # the U-Net config names SDXL modules as kohya does (sgm paths, lora_te1_ / lora_te2_)
        save_kohya_lora(modules, out_dir / kohya_name, dtype, unet_config=parts.unet.config),
    ]


@torch.no_grad()
def merge_lora(module: torch.nn.Module) -> int:
    """Fold every LoRA pair into its base weight, W += (alpha / rank) · B @ A, and unwrap it.

    Afterwards ``module`` has exactly its original modules and parameter names again (what
    ``save_folder`` and diffusers expect). Returns the number of merged layers.
    """
    layers = lora_layers(module)
    for name, layer in layers.items():
        base = layer.get_base_layer()
        down = layer.lora_A[ADAPTER].weight
        up = layer.lora_B[ADAPTER].weight
        delta = float(layer.scaling[ADAPTER]) * (up.flatten(1).float() @ down.flatten(1).float())
        base.weight.add_(delta.reshape(base.weight.shape).to(base.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, base)
    if layers and hasattr(module, "peft_config"):
        del module.peft_config  # peft refuses a second injection while it is set
    return len(layers)
