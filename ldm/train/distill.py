"""Latent consistency distillation (LCD; Luo et al. 2023, "Latent Consistency Models", Alg. 1).

The objective of a stage with a ``distill`` section. The student (the U-Net with LoRA, or all
of it) learns the consistency function f(x, t) of the teacher's guided probability-flow ODE:
x0 from the data, a solver index n, x at t_{n+k} = x0 + sigma eps (k-diffusion's space); the
teacher, classifier-free guidance folded in, takes one DDIM step to t_n (the skipping-step
solver over the N "original" timesteps); the loss is d(f_student(x, t_{n+k}), f_target(x_prev,
t_n)), the target an EMA of the student. f is ``ldm.sampling.consistency``'s (diffusers'
LCMScheduler's), so the student samples with the ``lcm`` sampler and with diffusers. With
``consistency: tcd``, f maps to a random earlier solver timestep instead (Zheng et al. 2024,
trajectory consistency), for the ``tcd`` sampler. Optionally, some rows start from the
student's own one-step samples instead of data (``backward_fraction``; ``Distiller.one_step``).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from ldm.denoiser import Denoiser
from ldm.errors import ConfigError, LdmError
from ldm.guidance import cfg
from ldm.request import check_stored_eta
from ldm.sampling.consistency import consistency_denoised
from ldm.sampling.samplers import SPEC
from ldm.sampling.schedules import NoiseSchedule, init_noise_scale, lcm_timesteps
from ldm.train.batches import batch_latents
from ldm.train.config import DistillConfig, StageConfig
from ldm.train.ema import EMA
from ldm.train.lora import lora_layers

TARGET = "distill-target-unet"  # checkpoint entries: the target's EMA shadow,
TEACHER = "distill-teacher-unet"  # and a full student's frozen teacher


def solver_timesteps(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """The skipping-step solver's grid t_i = (i + 1) k - 1, k = T // N (Luo et al. sec. 4.3;
    diffusers' DDIMSolver): (N,) int64, ascending, ending at T - 1."""
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.int64) * k - 1


def later_step_indices(student_steps: list[int], T: int, N: int) -> torch.Tensor:
    """Solver-grid indices of the timesteps where the student's LCM sampling at its step
    counts takes its second and later steps (one entry per step, so shared ones weigh more)."""
    k = T // N
    ts = [int(t) for s in student_steps if s > 1 for t in lcm_timesteps(s, T, N)[1:]]
    return torch.tensor([(t + 1) // k - 1 for t in ts], dtype=torch.int64)


def ddim_step(
    x: torch.Tensor,  # (B, C, H, W) at sigma, k-diffusion's space (x0 + sigma eps)
    sigma: torch.Tensor,  # (B,)
    sigma_next: torch.Tensor,  # (B,) lower noise level
    denoised: torch.Tensor,  # (B, C, H, W) the (guided) x0 estimate at (x, sigma)
) -> torch.Tensor:
    """One deterministic DDIM step (eta 0; Song et al. 2021, eq. 12) in k-diffusion's space:
    x_next = x0_hat + sigma_next eps_hat, eps_hat = (x - x0_hat) / sigma. On the VP latent
    x / sqrt(1 + sigma^2) this is sqrt(ab_next) x0_hat + sqrt(1 - ab_next) eps_hat."""
    s, s_next = (v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype) for v in (sigma, sigma_next))
    return denoised + s_next * (x - denoised) / s


def vp_ddim(x, sigma, sigma_s, denoised) -> torch.Tensor:
    """The DDIM step to sigma_s as a VP latent, sqrt(ab_s) x0_hat + sqrt(1 - ab_s) eps_hat: TCD's
    semi-linear consistency function (Zheng et al. 2024, eq. 9, first order)."""
    x_s = ddim_step(x, sigma, sigma_s, denoised)
    return x_s / (1 + sigma_s.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype) ** 2) ** 0.5


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, c: float):
    """L2, or pseudo-Huber sqrt(d^2 + c^2) - c (Song & Dhariwal 2023, sec. 3.3), mean over all."""
    d = pred.float() - target.float()
    if kind == "l2":
        return F.mse_loss(d, torch.zeros_like(d))
    return ((d.square() + c * c).sqrt() - c).mean()


def check_stage(stage: StageConfig) -> None:
    """A distill stage trains the U-Net only (the student); refuse anything else in one line."""
    d = stage.distill
    if list(stage.train) != ["unet"]:
        raise ConfigError(f"stages.{stage.name}: a distill stage trains [unet] (the student)")
    if stage.method == "lora" and stage.lora.text_encoder:
        raise ConfigError(f"stages.{stage.name}: a distill stage has no text-encoder LoRA")
    if d.num_ddim_timesteps < 1 or not d.student_steps or min(d.student_steps) < 1:
        raise ConfigError(f"stages.{stage.name}.distill: num_ddim_timesteps and student_steps "
                          "must be >= 1")  # fmt: skip
    if d.guidance_scale_max is not None and d.guidance_scale_max < d.guidance_scale:
        raise ConfigError(f"stages.{stage.name}.distill: guidance_scale_max < guidance_scale")
    if not 0.0 <= d.target_decay < 1.0:
        raise ConfigError(f"stages.{stage.name}.distill.target_decay: must be in [0, 1)")
    if d.sampler is not None and d.sampler not in SPEC:
        raise ConfigError(f"stages.{stage.name}.distill.sampler: {d.sampler!r} is none of "
                          f"{', '.join(SPEC)}")  # fmt: skip
    if d.eta is not None:  # stored with the student's sampler: the manifest's rule
        try:
            check_stored_eta(d.eta, SPEC[d.sampler or d.consistency])
        except LdmError as e:
            raise ConfigError(f"stages.{stage.name}.distill: {e}") from None
    if d.export_lora_rank is not None and (stage.method != "full" or d.export_lora_rank < 1):
        raise ConfigError(f"stages.{stage.name}.distill.export_lora_rank: a rank >= 1, for a "
                          "full student (a LoRA student is exported as its LoRA)")  # fmt: skip
    if not 0.0 <= d.backward_fraction <= 1.0:
        raise ConfigError(f"stages.{stage.name}.distill.backward_fraction: must be in [0, 1]")
    if d.backward_fraction and max(d.student_steps) < 2:
        raise ConfigError(f"stages.{stage.name}.distill.backward_fraction: needs a student step "
                          "count >= 2 (the timesteps of its later steps)")  # fmt: skip


class Distiller:
    """Teacher, skipping-step solver and EMA target of one distill stage; ``loss`` is a step."""

    def __init__(self, config: DistillConfig, parts, method: str):
        """Before ``set_trainable``: a full student's teacher is copied from the weights now."""
        self.config = config
        self.schedule = NoiseSchedule.from_scheduler_config(parts.scheduler_config)
        T = self.schedule.num_train_timesteps
        if config.num_ddim_timesteps > T:
            raise ConfigError(f"distill.num_ddim_timesteps: at most {T} (the training timesteps)")
        self.k = T // config.num_ddim_timesteps  # the skip between solver timesteps
        self.timesteps = solver_timesteps(T, config.num_ddim_timesteps)  # (N,)
        self.later_steps = later_step_indices(config.student_steps, T, config.num_ddim_timesteps)
        self.unet = parts.unet  # the student, unwrapped (LoRA: its base weights are the teacher)
        self.teacher_unet = None  # a full student's frozen copy of the teacher
        if method != "lora":
            self.teacher_unet = copy.deepcopy(parts.unet).requires_grad_(False).eval()
        self.target: EMA | None = None  # made by attach(), once the student's params are set

    def attach(self, student: Denoiser) -> None:
        """After ``set_trainable``: the student's denoiser, the teacher's and the EMA target."""
        self.student = student
        prediction = self.schedule.prediction_type
        self.teacher = Denoiser(
            self.teacher_unet or self.unet, self.schedule, prediction=prediction
        )
        self.frozen = Denoiser(self.unet, self.schedule, prediction=prediction)
        if self.config.target_decay > 0:  # diffusers' full-model LCD: 0.95, no warm-up
            self.target = EMA(self.unet, self.config.target_decay, warmup=False)

    # ---- the step ----------------------------------------------------------------------------
    def loss(self, latents, cond, uncond, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The LCD loss of one micro-batch of clean latents (B, C, h, w) and their conds."""
        cf, device, B = self.config, latents.device, latents.shape[0]
        # 1. solver index n; start t_{n+k} and end t_n (clamped at 0, as diffusers' example)
        index = torch.randint(0, cf.num_ddim_timesteps, (B,), generator=g)  # (B,)
        m = round(cf.backward_fraction * B)
        if m:  # the first m rows: where the student's own sampling puts them (see one_step)
            index[:m] = self.later_steps[torch.randint(0, len(self.later_steps), (m,), generator=g)]
            latents = torch.cat([self.one_step(latents[:m], cond[:m], g), latents[m:]])
        t_start = self.timesteps[index]
        t_end = (t_start - self.k).clamp(min=0)
        sigmas = self.student.sigmas.cpu()
        sigma, sigma_next = sigmas[t_start].to(device), sigmas[t_end].to(device)  # (B,)
        noise = torch.randn(latents.shape, generator=g).to(device)
        x = latents + sigma.view(-1, 1, 1, 1) * noise  # (B, C, h, w): x at t_{n+k}
        w = cf.guidance_scale
        if cf.guidance_scale_max is not None:  # one w per micro-batch (cfg takes one scale)
            w += (cf.guidance_scale_max - w) * float(torch.rand((), generator=g))
        s = cf.timestep_scaling

        # 2. teacher: guided DDIM step to t_n; target: the EMA student's output at (x_prev, t_n).
        # Before the student's forward: the target's weight swap is in place, and autograd
        # must not see the student's saved weights change
        with torch.no_grad():
            with self.teacher_weights():
                denoised = cfg(self.teacher, cond, uncond, w)(x, sigma)
            x_prev = ddim_step(x, sigma, sigma_next, denoised)
            with self._target_weights():
                target_denoised = self.frozen(x_prev, sigma_next, cond)

        # 3. the consistency function of the student at (x, t_{n+k}) (the only forward with
        # grads) and of the target at (x_prev, t_n): to x0 (lcm), or to one earlier s (tcd)
        student_denoised = self.student(x, sigma, cond)
        if cf.consistency == "tcd":
            sigma_s = sigmas[self.trajectory_end(index, g)].to(device)  # (B,)
            pred = vp_ddim(x, sigma, sigma_s, student_denoised)
            target = vp_ddim(x_prev, sigma_next, sigma_s, target_denoised)
        else:
            pred = consistency_denoised(x, sigma, t_start, student_denoised, s)
            target = consistency_denoised(x_prev, sigma_next, t_end, target_denoised, s)
        return consistency_loss(pred, target, cf.loss, cf.huber_c), {"guidance": w}

    def trajectory_end(self, index: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """TCD's end timesteps s (B,): t_j - k for j uniform in [0, n], so s <= t_n (clamped at
        0): the student maps x at t_{n+k} to anywhere on the rest of its trajectory."""
        j = (torch.rand(index.shape, generator=g) * (index + 1)).long().clamp(max=index)
        return (self.timesteps[j] - self.k).clamp(min=0)

    @torch.no_grad()
    def one_step(self, like: torch.Tensor, cond, g: torch.Generator) -> torch.Tensor:
        """The student's one-step samples f(x, T - 1) from the pipeline's first latents x, as
        (m, C, h, w) like ``like``.

        Noised to a later step's timestep, they are that step's input at sampling (exactly for
        the second step, approximately after): "backward distillation" (Kohler et al. 2024,
        Imagine Flash, sec. 3.1) trains the student where its few-step sampling goes, not only
        on noised data, where a 2-step sample's second step starts from a blurrier image.
        """
        t = self.timesteps[-1:]  # (1,) T - 1
        sigma = self.student.sigma_max.reshape(1).to(like.device)
        scale = init_noise_scale(sigma, self.schedule, "lcm")  # the pipeline's first latent
        x = torch.randn(like.shape, generator=g).to(like.device) * scale
        denoised = self.student(x, sigma.expand(len(x)), cond)
        return consistency_denoised(x, sigma, t, denoised, self.config.timestep_scaling)

    def after_step(self) -> None:
        if self.target is not None:
            self.target.update(self.unet)

    @contextlib.contextmanager
    def teacher_weights(self):
        """The teacher U-Net, in this block: a LoRA student's own U-Net with its adapters off
        (peft), a full student's frozen copy."""
        layers = list(lora_layers(self.unet).values()) if self.teacher_unet is None else []
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield self.teacher_unet or self.unet
        finally:
            for layer in layers:
                layer.enable_adapters(True)  # peft: also requires_grad on the adapter again

    @contextlib.contextmanager
    def _target_weights(self):
        """The EMA shadow in the student's parameters for the target's forward, then back."""
        if self.target is None:  # target_decay 0: the online student (diffusers' LoRA example)
            yield
            return
        params = dict(self.unet.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.target.shadow}
        self.target.copy_to(self.unet)
        # autocast caches its casts of trainable weights until the region ends: drop them, so
        # the target computes with the shadow and the student afterwards with its own weights
        torch.clear_autocast_cache()
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in backup.items():
                    params[n].copy_(v)
            torch.clear_autocast_cache()

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """What a mid-stage checkpoint needs besides the student: target shadow, teacher copy."""
        state = {}
        if self.target is not None:
            state[TARGET] = self.target.shadow
        if self.teacher_unet is not None:
            state[TEACHER] = self.teacher_unet.state_dict()
        return state

    def load_state_tensors(self, weights: dict, num_updates: int) -> None:
        if self.target is not None:
            self.target.load_state_dict({"num_updates": num_updates, "shadow": weights[TARGET]})
        if self.teacher_unet is not None:
            self.teacher_unet.load_state_dict(weights[TEACHER], strict=True)


def distill_loss_for_step(parts, st, g, index: int, device) -> tuple[torch.Tensor, dict]:
    """One micro-batch of latent consistency distillation (ldm.train.distill): the captions
    unchanged (no dropout) as cond, the dropped-caption Cond as the teacher's uncond."""
    batch = st.data.batch(index)
    latents = batch_latents(parts, batch, g, device)
    n = len(batch.captions)
    cond = st.text(batch.captions, [False] * n, batch.sizes, device)
    uncond = st.text(batch.captions, [True] * n, batch.sizes, device)
    return st.distiller.loss(latents, cond, uncond, g)
