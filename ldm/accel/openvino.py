"""``openvino``: run a module's forward through OpenVINO, converted once per input shape.

``ov.convert_model`` traces the plain module with example inputs; the converted model is saved
on disk (``<cache_dir>/<class>-<weights fingerprint>-<shapes>.xml``), so a later process only
reads and compiles it (under a second, against tens of seconds to convert an SD 1.5 U-Net).
Shapes (batch, H, W, context length) are static per conversion: each new shape converts once.
Inputs and outputs stay torch tensors; the module's weights and state_dict are untouched.
Precision: OpenVINO's ``INFERENCE_PRECISION_HINT`` follows the model's dtype (its CPU plugin
would otherwise run fp32 models in bf16 where the CPU has bf16 units). Inference only.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import torch
from torch import nn

from ldm.errors import LdmError
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.unet import UNet2DConditionModel

DEFAULT_CACHE = Path.home() / ".cache" / "ldm" / "openvino"
_PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def fingerprint(module: nn.Module) -> str:
    """A cheap weights key: names, shapes, dtypes and ~64 strided samples of every tensor."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)].float().cpu().numpy()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


class _Traceable(nn.Module):
    """The module's own (class) forward on float32 tensors named ``names``: what gets traced."""

    def __init__(self, module: nn.Module, names: tuple[str, ...], dtype: torch.dtype):
        super().__init__()
        self.module, self.names, self.dtype = module, names, dtype

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        kwargs = {n: t.to(self.dtype) if t.is_floating_point() else t
                  for n, t in zip(self.names, tensors)}  # fmt: skip
        return type(self.module).forward(self.module, **kwargs).float()


class OpenVinoForward:
    """Replaces ``module.forward``: picks (or converts) the compiled model for the input shapes."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, cache_dir: Path | None):
        import openvino as ov

        self.module, self.dtype = module, dtype
        self.cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
        self.signature = inspect.signature(type(module).forward)
        self.core = ov.Core()
        self.config = {"INFERENCE_PRECISION_HINT": _PRECISION.get(dtype, "f32")}
        self.key = f"{type(module).__name__}-{fingerprint(module)}"
        self.compiled: dict[tuple, object] = {}

    def inputs(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """The call's tensors by parameter name, float32, the U-Net's timestep as (B,)."""
        bound = self.signature.bind(self.module, *args, **kwargs)
        named = {n: v for n, v in list(bound.arguments.items())[1:] if v is not None}
        if isinstance(self.module, UNet2DConditionModel):
            batch = named["sample"].shape[0]
            t = torch.as_tensor(named["timestep"], dtype=torch.float32).reshape(-1)
            named["timestep"] = t.expand(batch) if t.numel() == 1 else t
        for name, value in named.items():
            if not isinstance(value, torch.Tensor):
                raise LdmError(f"openvino: {type(self.module).__name__} argument {name} is not "
                               "a tensor; use --accel ldm-cpu or off")  # fmt: skip
            named[name] = value.detach().float().contiguous()
        return named

    def compiled_for(self, named: dict[str, torch.Tensor]):
        shapes = tuple((n, tuple(t.shape)) for n, t in named.items())
        if shapes not in self.compiled:
            self.compiled[shapes] = self._load_or_convert(named, shapes)
        return self.compiled[shapes]

    def _load_or_convert(self, named: dict[str, torch.Tensor], shapes: tuple):
        import openvino as ov

        tag = hashlib.sha256(repr((shapes, str(self.dtype))).encode()).hexdigest()[:12]
        path = self.cache_dir / f"{self.key}-{tag}.xml"
        if path.exists():
            model = self.core.read_model(path)
        else:
            traceable = _Traceable(self.module, tuple(named), self.dtype)
            with torch.no_grad():
                model = ov.convert_model(traceable, example_input=tuple(named.values()))
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.stem + ".tmp.xml")  # atomic: a killed run leaves no half file
            ov.save_model(model, tmp, compress_to_fp16=False)
            tmp.with_suffix(".bin").replace(path.with_suffix(".bin"))
            tmp.replace(path)
        return self.core.compile_model(model, "CPU", self.config)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        named = self.inputs(args, kwargs)
        result = self.compiled_for(named)([t.numpy() for t in named.values()])
        return torch.from_numpy(result[0]).to(self.dtype)


def apply_openvino(module: nn.Module, dtype: torch.dtype, cache_dir: Path | None) -> None:
    """Run ``module``'s forward (the VAE: its encoder's and decoder's) through OpenVINO."""
    # the autoencoder's work is in its encoder and decoder; its own forward samples a latent
    targets = [module.encoder, module.decoder] if isinstance(module, AutoencoderKL) else [module]
    for target in targets:
        target.forward = OpenVinoForward(target, dtype, cache_dir)
