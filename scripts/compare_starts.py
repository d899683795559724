"""Start folders for issue 21's comparison (docs/benchmarks.md): each arm's network and text
encoders freshly initialised from its model config, with the bundled demo's autoencoder (the
demo recipe's stage 1, shared by every arm so that only the diffusion stage differs).

    python scripts/compare_starts.py runs/compare
"""

from __future__ import annotations

import sys
from pathlib import Path

ARMS = {
    "eps-unet": "configs/models/shapes64.yaml",
    "flow-unet": "configs/models/shapes64-flow.yaml",
    "flow-mmdit": "configs/models/shapes64-mmdit.yaml",
}


def main(out: str) -> None:
    import torch

    from ldm.loading import load_model
    from ldm.models.build import build_model, load_model_config
    from ldm.train.model import export_model

    vae = load_model("ldm/assets/shapes-demo", device="cpu", dtype=torch.float32).vae
    for arm, config in ARMS.items():
        parts = build_model(load_model_config(config), seed=0)
        parts.vae.load_state_dict(vae.state_dict(), strict=True)
        parts.vae.config.scaling_factor = vae.config.scaling_factor
        export_model(parts, Path(out) / f"{arm}-start", "fp32")
        print(f"{arm}: {Path(out) / f'{arm}-start'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/compare")
