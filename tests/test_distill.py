"""ldm distill's numerics (latent consistency distillation, ldm/train/distill.py) on tiny models.

The skipping-step solver against diffusers' DDIMScheduler and the Gaussian closed form; one LCD
step against the algorithm of diffusers' train_lcm_distill_lora_sd_wds.py written out here in VP
space with diffusers' own U-Net, DDIMScheduler and LCMScheduler; the EMA target under autocast.
The trainer's runs (resume, export, end to end) are in test_distill_runs.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.train.distill import ddim_step, solver_timesteps

SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                num_train_timesteps=1000)  # fmt: skip


def _alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE).alphas_cumprod.double()


# ---- the skipping-step solver -----------------------------------------------------------------
def test_solver_grid_is_the_trailing_ddim_grid():
    """t_i = (i + 1) k - 1: diffusers' DDIMScheduler 'trailing' 50-step timesteps (999 ... 19)."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(**SCHEDULE, timestep_spacing="trailing")
    ddim.set_timesteps(50)
    ours = solver_timesteps(1000, 50)
    assert ours.tolist() == sorted(ddim.timesteps.tolist())
    assert ours[0] == 19 and ours[-1] == 999 and (ours.diff() == 20).all()


@pytest.mark.parametrize("t", [999, 519, 39, 19])  # 19: the step to t = 0 (alpha_prev = ab_0)
def test_ddim_step_equals_diffusers_ddim_scheduler(t):
    """k-space DDIM step = DDIMScheduler.step (eta 0, 50 steps: prev = t - 20) on the VP latent."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(**SCHEDULE, set_alpha_to_one=False, clip_sample=False)
    ddim.set_timesteps(50)
    ab = _alphas_cumprod()
    g = torch.Generator().manual_seed(t)
    x_vp, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    expected = ddim.step(eps[None], t, x_vp[None], eta=0.0).prev_sample[0]

    t_prev = max(t - 20, 0)  # the example's clamp; DDIMScheduler reads ab_0 there too
    sigma = ((1 - ab[t]) / ab[t]).sqrt().reshape(1)
    sigma_prev = ((1 - ab[t_prev]) / ab[t_prev]).sqrt().reshape(1)
    x = x_vp[None] / ab[t].sqrt()  # k-diffusion's x = x_vp * sqrt(1 + sigma^2)
    denoised = x - sigma * eps[None]  # the eps model's x0
    ours = ddim_step(x, sigma, sigma_prev, denoised) * ab[t_prev].sqrt()
    torch.testing.assert_close(ours[0], expected, rtol=1e-5, atol=1e-6)  # diffusers: fp32 abar


def test_ddim_steps_converge_to_the_gaussian_ode_solution():
    """Data N(0, s^2): D(x, sigma) = x s^2 / (s^2 + sigma^2) exactly, and the probability-flow
    ODE's solution is x(sigma) = x(sigma_0) sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2)). DDIM is
    first order: doubling the steps about halves the error."""
    s2, sigma_max, sigma_min = 0.25, 14.6, 0.03
    x_max = torch.linspace(-3, 3, 7, dtype=torch.float64).reshape(1, 7, 1, 1) * sigma_max
    exact = x_max * ((s2 + sigma_min**2) / (s2 + sigma_max**2)) ** 0.5

    def solve(n: int) -> torch.Tensor:
        sigmas = torch.linspace(np.log(sigma_max), np.log(sigma_min), n + 1).double().exp()
        x = x_max
        for s, s_next in zip(sigmas[:-1].double(), sigmas[1:].double()):
            x = ddim_step(x, s.reshape(1), s_next.reshape(1), x * s2 / (s2 + s**2))
        return x

    errors = [(solve(n) - exact).abs().max().item() for n in (20, 40, 80)]
    assert errors[2] < 0.03 * exact.abs().max().item(), errors
    assert errors[1] < 0.6 * errors[0] and errors[2] < 0.6 * errors[1], errors


# ---- one LCD step against the example's algorithm ---------------------------------------------
def _lcm_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(**SCHEDULE)
    pairs = [scheduler.get_scalings_for_boundary_condition_discrete(int(v)) for v in t]
    c_skip, c_out = (torch.tensor([p[i] for p in pairs]).view(-1, 1, 1, 1) for i in (0, 1))
    return c_skip.float(), c_out.float()


def _tcd_map(x_vp, eps, t, s, ab):
    """TCD's semi-linear consistency function in its exponential-integrator form (Zheng et al.
    2024, eq. 9): x_s = (sigma_s / sigma_t) x_t - alpha_s (e^-h - 1) x0_hat, h = lambda_s -
    lambda_t, lambda = log(alpha / sigma), alpha = sqrt(ab), sigma = sqrt(1 - ab) (VP)."""
    a_t, a_s = ab[t].sqrt().view(-1, 1, 1, 1), ab[s].sqrt().view(-1, 1, 1, 1)
    s_t, s_s = (1 - ab[t]).sqrt().view(-1, 1, 1, 1), (1 - ab[s]).sqrt().view(-1, 1, 1, 1)
    h = (a_s / s_s).log() - (a_t / s_t).log()
    x0_hat = (x_vp - s_t * eps) / a_t
    return s_s / s_t * x_vp - a_s * (torch.exp(-h) - 1) * x0_hat


def _example_loss(folder, student_sd, target_sd, x0, context, uncontext, w, index, noise, c,
                  tcd_end=None):  # fmt: skip
    """diffusers' train_lcm_distill_lora_sd_wds.py step 2-10 in VP space, with diffusers' U-Net
    (teacher: the base weights; student and target: the given merged weights), DDIMScheduler
    for the solver step and LCMScheduler for c_skip / c_out; with ``tcd_end`` timesteps, TCD's
    training step instead (its consistency function to them, no boundary scalings)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    ab = _alphas_cumprod().float()
    unets = {}
    for name, sd in (("teacher", None), ("student", student_sd), ("target", target_sd)):
        unets[name] = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
        if sd is not None:
            unets[name].load_state_dict(sd)
    ddim = DDIMScheduler(**SCHEDULE, set_alpha_to_one=False, clip_sample=False)
    ddim.set_timesteps(50)
    start = solver_timesteps(1000, 50)[index]
    end = (start - 20).clamp(min=0)
    a, s = ab[start].sqrt().view(-1, 1, 1, 1), (1 - ab[start]).sqrt().view(-1, 1, 1, 1)
    x_vp = a * x0 + s * noise  # DDPMScheduler.add_noise
    with torch.no_grad():
        eps = unets["student"](x_vp, start, encoder_hidden_states=context).sample
        c_skip, c_out = _lcm_scalings(start)
        model_pred = c_skip * x_vp + c_out * (x_vp - s * eps) / a
        e_c = unets["teacher"](x_vp, start, encoder_hidden_states=context).sample
        e_u = unets["teacher"](x_vp, start, encoder_hidden_states=uncontext).sample
        guided = e_c + (w - 1) * (e_c - e_u)  # the example's LCM form with w_LCM = w - 1
        x_prev = torch.cat([ddim.step(guided[i : i + 1], int(start[i]), x_vp[i : i + 1]).prev_sample
                            for i in range(len(start))])  # fmt: skip
        a_e, s_e = ab[end].sqrt().view(-1, 1, 1, 1), (1 - ab[end]).sqrt().view(-1, 1, 1, 1)
        eps_t = unets["target"](x_prev, end, encoder_hidden_states=context).sample
        c_skip_e, c_out_e = _lcm_scalings(end)
        target = c_skip_e * x_prev + c_out_e * (x_prev - s_e * eps_t) / a_e
        if tcd_end is not None:
            model_pred = _tcd_map(x_vp, eps, start, tcd_end, ab)
            target = _tcd_map(x_prev, eps_t, end, tcd_end, ab)
    return (((model_pred - target) ** 2 + c * c).sqrt() - c).mean()


def _lcm_one_step(folder, student_sd, z, context):
    """The student's one-step sample from unit noise z: diffusers' U-Net and LCMScheduler."""
    from diffusers import LCMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    unet.load_state_dict(student_sd)
    scheduler = LCMScheduler(**SCHEDULE)
    scheduler.set_timesteps(1, original_inference_steps=50)
    (t,) = scheduler.timesteps
    with torch.no_grad():
        eps = unet(z, t, encoder_hidden_states=context).sample
    return scheduler.step(eps, t, z).denoised


def _later_step_indices() -> torch.Tensor:
    """Solver indices of the 2nd, 3rd, 4th step timesteps of LCMScheduler at 4, then 2 steps."""
    from diffusers import LCMScheduler

    ts = []
    for n in (4, 2):
        scheduler = LCMScheduler(**SCHEDULE)
        scheduler.set_timesteps(n, original_inference_steps=50)
        ts += scheduler.timesteps[1:].tolist()
    return torch.tensor([(t + 1) // 20 - 1 for t in ts])


# backward 1: every row starts from the student's own one-step sample at a later LCM timestep
@pytest.mark.parametrize("backward, consistency", [(0.0, "lcm"), (1.0, "lcm"), (0.0, "tcd")])
def test_one_lcd_step_equals_the_example_algorithm(tiny_sd1, backward, consistency):
    """Distiller.loss (k-space, ldm's U-Net, LoRA student, EMA target) = the example's loss;
    with ``consistency: tcd``, the TCD authors' training step (end timesteps drawn as theirs)."""
    from ldm.formats.diffusers_folder import load_folder
    from ldm.text.cond import Cond
    from ldm.train.config import DistillConfig, LoRAConfig
    from ldm.train.distill import Distiller
    from ldm.train.lora import add_lora, merge_lora

    torch.manual_seed(0)
    parts = load_folder(tiny_sd1)
    config = DistillConfig(guidance_scale=3.0, loss="huber", target_decay=0.95,
                           student_steps=[4, 2], backward_fraction=backward,
                           consistency=consistency)  # fmt: skip
    distiller = Distiller(config, parts, "lora")
    add_lora(parts.unet, "unet", LoRAConfig(rank=4, alpha=4.0, targets=["to_q", "to_v", "conv1"]))
    with torch.no_grad():  # a trained-looking adapter: lora_B away from zero
        for name, p in parts.unet.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)
    from ldm.denoiser import Denoiser
    from ldm.sampling.schedules import NoiseSchedule

    student = Denoiser(parts.unet, NoiseSchedule.from_scheduler_config(parts.scheduler_config))
    distiller.attach(student)
    with torch.no_grad():  # the target network: an EMA shadow unlike the student
        for v in distiller.target.shadow.values():
            v.add_(0.1 * torch.randn_like(v))

    B = 4
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(B, 4, 8, 8, generator=g)
    context, uncontext = torch.randn(2, B, 77, 32, generator=g)
    # the draws Distiller.loss makes: a seed whose indices include 0 (t_start 19 -> t_end 0,
    # the boundary condition's end: c_skip 1, c_out 0)
    seed = next(
        s
        for s in range(1000)
        if 0 in torch.randint(0, 50, (B,), generator=torch.Generator().manual_seed(s))
    )
    g_ref = torch.Generator().manual_seed(seed)
    index = torch.randint(0, 50, (B,), generator=g_ref)
    if backward:
        index = _later_step_indices()[torch.randint(0, 4, (B,), generator=g_ref)]
        z = torch.randn(x0.shape, generator=g_ref)
    noise = torch.randn(x0.shape, generator=g_ref)
    tcd_end = None
    if consistency == "tcd":  # s = t_j - k, j uniform in [0, n] (clamped at 0), as TCD's script
        j = (torch.rand(B, generator=g_ref) * (index + 1)).long()
        tcd_end = (solver_timesteps(1000, 50)[j] - 20).clamp(min=0)
        assert 0 < tcd_end.max() < (solver_timesteps(1000, 50)[index] - 20).max()
    g = torch.Generator().manual_seed(seed)
    loss, metrics = distiller.loss(x0, Cond(context), Cond(uncontext), g)
    assert metrics["guidance"] == 3.0

    unet = parts.unet
    student_sd = {k: v.clone() for k, v in unet.state_dict().items()}
    with distiller._target_weights():
        target_sd = {k: v.clone() for k, v in unet.state_dict().items()}
    plain = {}
    for name, sd in (("student", student_sd), ("target", target_sd)):
        unet.load_state_dict(sd)
        copy = load_folder(tiny_sd1)
        add_lora(
            copy.unet, "unet", LoRAConfig(rank=4, alpha=4.0, targets=["to_q", "to_v", "conv1"])
        )
        copy.unet.load_state_dict(sd)
        merge_lora(copy.unet)
        plain[name] = copy.unet.state_dict()
    if backward:
        x0 = _lcm_one_step(tiny_sd1, plain["student"], z, context)
    expected = _example_loss(tiny_sd1, plain["student"], plain["target"], x0, context,
                             uncontext, 3.0, index, noise, config.huber_c, tcd_end)  # fmt: skip
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_the_target_sees_its_ema_weights_under_bf16_autocast(tiny_sd1):
    """The target's in-place swap under autocast (which caches casts of trainable weights): the
    target computes with the shadow, and the student afterwards with its own weights again."""
    from ldm.denoiser import Denoiser
    from ldm.formats.diffusers_folder import load_folder
    from ldm.sampling.schedules import NoiseSchedule
    from ldm.text.cond import Cond
    from ldm.train.config import DistillConfig, LoRAConfig
    from ldm.train.distill import Distiller
    from ldm.train.lora import add_lora

    parts = load_folder(tiny_sd1)
    distiller = Distiller(DistillConfig(), parts, "lora")
    add_lora(parts.unet, "unet", LoRAConfig(rank=4, alpha=4.0))
    distiller.attach(Denoiser(parts.unet, NoiseSchedule.from_scheduler_config(
        parts.scheduler_config)))  # fmt: skip
    with torch.no_grad():
        for v in distiller.target.shadow.values():
            v.normal_(0, 0.3)
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3.0, 3.0])
    cond = Cond(torch.randn(2, 77, 32, generator=g))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = distiller.frozen(x, sigma, cond)
        with distiller._target_weights():
            target = distiller.frozen(x, sigma, cond)
        after = distiller.frozen(x, sigma, cond)
    assert (target - before).abs().max() > 1e-2  # not the student's cached casts
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize(
    "fields, message",
    [({"backward_fraction": 1.5}, r"must be in \[0, 1\]"),
     ({"backward_fraction": 0.5, "student_steps": [1]}, "step count >= 2"),
     ({"sampler": "Euler a"}, "is none of ddim, ddpm, euler"),
     ({"eta": 0.5}, "distill: eta needs a sampler that takes one .* not lcm"),
     ({"export_lora_rank": 8}, "export_lora_rank: a rank >= 1, for a full student")],
)  # fmt: skip
def test_check_stage_refuses_what_it_cannot_use(fields, message):
    from ldm.errors import ConfigError
    from ldm.train.config import DistillConfig, StageConfig
    from ldm.train.distill import check_stage

    stage = StageConfig(train=["unet"], method="lora", distill=DistillConfig(**fields))
    with pytest.raises(ConfigError, match=message):
        check_stage(stage)
