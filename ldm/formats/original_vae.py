"""A single file's autoencoder (SD3, FLUX.1): the file's VAE under its diffusers config, or the
``--config`` folder's ``vae/`` when the file has none."""

from __future__ import annotations

from ldm.errors import CheckpointError
from ldm.formats.diffusers_folder import fix_vae_keys, load_part, load_weights, read_json
from ldm.formats.original_config import check_guesses
from ldm.formats.original_keys import remap, vae_attn_shapes, vae_pairs
from ldm.models.build import build_vae


def load_file_vae(vae_sd, config, folder, source, device, dtype, inferred, keys: str):
    """A single file's VAE (``config(state)`` gives its diffusers config), else the --config
    folder's vae/; neither is a one-line error naming the ``keys`` looked for."""
    if vae_sd:
        vae_sd = vae_attn_shapes(vae_sd, False)
        vae_config = config(vae_sd)
        check_guesses(None, vae_config, [], source)
        vae = build_vae(vae_config, f"{source} (vae)", empty=True)
        load_weights(vae, remap(vae_sd, vae_pairs(vae_config), False, source), f"{source} (vae)",
                     device, dtype)  # fmt: skip
        return vae
    if folder is not None and (folder / "vae" / "config.json").is_file():
        inferred["vae"] = f"from {folder}"
        vae = build_vae(read_json(folder / "vae" / "config.json"), folder / "vae", empty=True)
        state = fix_vae_keys(load_part(folder / "vae", "diffusers", dtype))
        load_weights(vae, state, str(folder / "vae"), device, dtype)
        return vae
    raise CheckpointError(f"{source}: no VAE weights ({keys}): pass --config FOLDER, a diffusers "
                          "folder that has vae/")  # fmt: skip
