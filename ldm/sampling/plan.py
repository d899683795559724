"""What one request samples on: the Denoiser that reads the model's noise levels, the sigmas
for its sampler and schedule (cut for img2img or a base / refiner hand-off), where its first
latent starts, and the options its sampler takes.

Discrete-time models (SD 1.x/2.x/XL) carry a ``NoiseSchedule`` of training betas; flow models
(SD3, FLUX: a ``FlowMatch*`` scheduler config) have none, and their sigmas are flow times from
``ldm.sampling.flow``. The pipeline and the refiner call these functions instead of branching.
"""

from __future__ import annotations

import torch

from ldm.denoiser import Denoiser, Flow
from ldm.errors import LdmError
from ldm.guidance import SkipLayerGuidance
from ldm.sampling.flow import flow_sigmas
from ldm.sampling.schedules import (
    NoiseSchedule,
    get_sigmas,
    init_noise_scale,
    part_of_schedule,
    timestep_interp,
)


def is_flow(scheduler_config: dict) -> bool:
    """A rectified-flow model: diffusers' FlowMatch schedulers (SD3, FLUX)."""
    return str(scheduler_config.get("_class_name", "")).startswith("FlowMatch")


def noise_schedule(scheduler_config: dict) -> NoiseSchedule | None:
    """The discrete-time table of a scheduler config, None for a flow model."""
    return (
        None if is_flow(scheduler_config) else NoiseSchedule.from_scheduler_config(scheduler_config)
    )


def make_denoiser(network, schedule: NoiseSchedule | None, r, dtype=None, family=None) -> Denoiser:
    """The network as D(x, sigma): flow (t = sigma * the family's timestep scale: SD3 1000,
    FLUX 1) or the discrete table, whose sigma -> timestep interpolation reproduces diffusers'
    for the request's sampler."""
    if family is not None and family.latent_patch > 1:  # FLUX: tokens are 2x2 latent patches
        from ldm.models.flux_packing import PackedFlux

        network = PackedFlux(network)  # image-shaped for the Denoiser and samplers
    if schedule is None:
        scale = 1000.0 if family is None else family.timestep_scale
        return Denoiser(network, None, prediction=Flow(scale), dtype=dtype)
    return Denoiser(network, schedule, timestep_interp(r.spec.name, r.schedule), dtype=dtype)


def request_sigmas(
    r,  # ldm.request.Request
    denoiser: Denoiser,
    schedule: NoiseSchedule | None,
    scheduler_config: dict,
    image_seq_len: int | None = None,  # image tokens (flow models' dynamic shift)
    family=None,  # ldm.models.families.Family: FLUX's sigmas are FluxPipeline's
) -> torch.Tensor:
    """Descending sigmas ending in 0 for the request: its schedule, then the part it runs.

    A flow model that shifts by image size (FLUX.1-dev) takes mu linear in its image tokens,
    ((H / 8) / 2) * ((W / 8) / 2) for FLUX's 8x VAE and 2 x 2 packing (``ldm.sampling.flow``).
    """
    if schedule is None:
        if not r.spec.flow:
            raise LdmError(f"sampler {r.spec.name!r} does not run on flow models")
        config = scheduler_config if r.shift is None else {**scheduler_config, "shift": r.shift}
        pipeline = family is not None and family.pipeline_sigmas
        sigmas = flow_sigmas(r.schedule, r.steps, config, image_seq_len=image_seq_len,
                             pipeline_sigmas=pipeline)  # fmt: skip
    else:
        sigmas = get_sigmas(r.schedule, r.steps, schedule, sampler=r.spec.name)
    sigmas = sigmas.to(denoiser.sigma_max.device)
    if r.denoising_start is not None or r.denoising_end is not None:
        t = denoiser.sigma_to_t(sigmas[:-1])  # the timestep of each step
        T = 1000 if schedule is None else schedule.num_train_timesteps
        return part_of_schedule(sigmas, t, T, r.denoising_start, r.denoising_end)
    if r.start_from_image:
        if schedule is None:  # diffusers' SD3 img2img: the first int(steps * (1 - strength))
            skip = int(max(r.steps - r.steps * r.strength, 0))
        else:  # diffusers' SD img2img: steps - int(steps * strength)
            skip = r.steps - min(int(r.steps * r.strength), r.steps)
        sigmas = sigmas[skip:]
        if len(sigmas) < 2:
            raise LdmError(f"--strength {r.strength} x --steps {r.steps} leaves no step to run")
    return sigmas


def first_latents(
    r,
    denoiser: Denoiser,
    schedule: NoiseSchedule | None,
    sigmas: torch.Tensor,
    noise: torch.Tensor,  # (B, C, h, w) unit noise
    init_latents: torch.Tensor | None,  # (B, C, h, w) the encoded init image (img2img)
) -> torch.Tensor:
    """The sampler's starting x: the init image noised to sigmas[0] (diffusers' add_noise /
    scale_noise), else noise at the scale diffusers' scheduler starts from."""
    if r.start_from_image:
        return denoiser.parametrisation.noised(init_latents, noise, sigmas[0])
    if schedule is None:  # flow: x = (1 - sigma) x0 + sigma eps, and sigma_0 is 1 (pure noise)
        return noise * sigmas[0]
    return noise * init_noise_scale(sigmas, schedule, r.spec.name, r.schedule)


def sampler_options(r, denoiser: Denoiser, schedule: NoiseSchedule | None) -> dict:
    """The options that make the sampler reproduce diffusers' scheduler for this model."""
    if schedule is None:
        options = r.spec.flow_options(r.eta)
    else:
        options = r.spec.options(schedule, r.eta)
    if r.spec.timestep_maps:  # LCM, TCD: defined on the training timesteps
        options.update(sigma_to_t=denoiser.sigma_to_t, t_to_sigma=denoiser.t_to_sigma)
    return options


def skip_layer_guidance(r, sigmas: torch.Tensor) -> SkipLayerGuidance | None:
    """The request's skip-layer guidance on its sigmas: active at steps i with start * n < i <
    stop * n (diffusers' SD3 pipeline), as the sigma range those steps cover."""
    n = len(sigmas) - 1
    active = [i for i in range(n) if r.skip_layer_start * n < i < r.skip_layer_stop * n]
    if not r.skip_layers or not active:
        return None
    hi, lo = float(sigmas[active[0]]), float(sigmas[active[-1]])
    return SkipLayerGuidance(tuple(r.skip_layers), r.skip_layer_scale, hi, lo)
