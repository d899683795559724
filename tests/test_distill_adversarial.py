"""The adversarial term of ldm distill (``distill.adversarial``; ldm/train/discriminator.py).

One step of Distiller.loss with the term: what the discriminator sees (the data latents, the
student's x0 estimate at the step's own x and sigma), the total written out from the hinge losses,
and that one backward keeps the two players apart (the student's gradient is the consistency
loss's plus the generator term's; the discriminator's is its hinge loss's). The discriminator's
optimizer state in a checkpoint; exact resume of such a run is in test_distill_runs.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _distiller(folder, adversarial: float, seed: int = 0):
    from ldm.denoiser import Denoiser
    from ldm.formats.diffusers_folder import load_folder
    from ldm.sampling.schedules import NoiseSchedule
    from ldm.train.config import DistillConfig, LoRAConfig
    from ldm.train.distill import Distiller
    from ldm.train.lora import add_lora

    torch.manual_seed(0)
    parts = load_folder(folder)
    config = DistillConfig(guidance_scale=3.0, target_decay=0.0, adversarial=adversarial)
    distiller = Distiller(config, parts, "lora", seed)
    add_lora(parts.unet, "unet", LoRAConfig(rank=4, alpha=4.0, targets=["to_q", "to_v", "conv1"]))
    with torch.no_grad():  # a trained-looking adapter: lora_B away from zero
        for name, p in parts.unet.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)
    schedule = NoiseSchedule.from_scheduler_config(parts.scheduler_config)
    distiller.attach(Denoiser(parts.unet, schedule))
    return distiller, parts


def _grads(params) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def test_adversarial_step_feeds_each_player_its_own_loss(tiny_sd1):
    from ldm.text.cond import Cond
    from ldm.train.discriminator import pooled_text

    lam, B = 0.3, 4
    distiller, parts = _distiller(tiny_sd1, lam)
    student = [p for p in parts.unet.parameters() if p.requires_grad]
    disc = list(distiller.disc.parameters())
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(B, 4, 8, 8, generator=g)
    context, uncontext = torch.randn(2, B, 77, 32, generator=g)
    cond, uncond = Cond(context), Cond(uncontext)

    seen = {}
    original = distiller.adversarial

    def spy(real, fake, c):
        state = {k: v.clone() for k, v in distiller.disc.state_dict().items()}
        seen.update(real=real, fake=fake.detach().clone(), disc=state)
        return original(real, fake, c)

    distiller.adversarial = spy
    loss, metrics = distiller.loss(x0, cond, uncond, torch.Generator().manual_seed(11))
    loss.backward()
    student_grad, disc_grad = _grads(student), _grads(disc)
    for p in student + disc:
        p.grad = None

    # the draws Distiller.loss makes (no backward rows): solver index, then noise
    g_ref = torch.Generator().manual_seed(11)
    index = torch.randint(0, 50, (B,), generator=g_ref)
    noise = torch.randn(x0.shape, generator=g_ref)
    sigma = distiller.student.sigmas[distiller.timesteps[index]]
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    fake = distiller.student(x, sigma, cond)  # the student's x0 estimate, with its graph
    torch.testing.assert_close(seen["real"], x0, rtol=0, atol=0)
    torch.testing.assert_close(seen["fake"], fake.detach(), rtol=1e-5, atol=1e-6)

    # the total, written out: LCD + lam * (-mean D(fake)) + mean relu(1 - D(real)) +
    # mean relu(1 + D(fake))
    disc_net, distiller.disc = distiller.disc, None  # the same step without the term
    lcd, _ = distiller.loss(x0, cond, uncond, torch.Generator().manual_seed(11))
    distiller.disc = disc_net
    # (replayed from the discriminator's state then: spectral norm's power iteration moves its
    # estimate at each forward, in the order real, detached fake, fake)
    text = context.mean(1)
    distiller.disc.load_state_dict(seen["disc"])
    d_real, d_fake_detached = distiller.disc(x0, text), distiller.disc(fake.detach(), text)
    d_fake = distiller.disc(fake, text)
    hinge = F.relu(1 - d_real).mean() + F.relu(1 + d_fake_detached).mean()
    torch.testing.assert_close(loss, lcd - lam * d_fake.mean() + hinge, rtol=1e-6, atol=1e-7)
    assert abs(metrics["adv_d"] - hinge.item()) < 1e-5 and d_real.shape == (B,)
    torch.testing.assert_close(pooled_text(context, None), text)

    # each player's gradient: the student's from LCD and the generator term only, the
    # discriminator's from its hinge loss only
    expected_student = torch.autograd.grad(lcd - lam * d_fake.mean(), student, retain_graph=True)
    lcd_only = torch.autograd.grad(lcd, student, retain_graph=True)
    expected_disc = torch.autograd.grad(hinge, disc)
    for got, want in zip(student_grad, expected_student, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    for got, want in zip(disc_grad, expected_disc, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert any(v.abs().max() > 0 for v in disc_grad)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(student_grad, lcd_only))


def test_discriminator_step_and_its_checkpoint_round_trip(tiny_sd1):
    """after_step takes the discriminator's Adam step and clears its grads; its weights and
    optimizer state survive state_tensors -> load_state_tensors bit for bit."""
    from ldm.text.cond import Cond

    distiller, _ = _distiller(tiny_sd1, 0.1)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    cond, uncond = (Cond(t) for t in torch.randn(2, 2, 77, 32, generator=g))
    before = {k: v.clone() for k, v in distiller.disc.state_dict().items()}
    loss, _ = distiller.loss(x0, cond, uncond, torch.Generator().manual_seed(2))
    loss.backward()
    distiller.after_step()
    after = distiller.disc.state_dict()
    moved = [k for k in before if "original" in k and not torch.equal(before[k], after[k])]
    assert moved and all(p.grad is None for p in distiller.disc.parameters())

    state = distiller.state_tensors()
    other, _ = _distiller(tiny_sd1, 0.1, seed=5)  # other initial weights, no Adam state yet
    other.load_state_tensors({k: {n: v.clone() for n, v in sd.items()} for k, sd in
                              state.items()}, num_updates=1)  # fmt: skip
    for k, v in distiller.disc.state_dict().items():
        torch.testing.assert_close(other.disc.state_dict()[k], v, rtol=0, atol=0)
    a, b = distiller.disc_optim.state_dict(), other.disc_optim.state_dict()
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) == len(list(distiller.disc.parameters()))
    for i in a["state"]:
        for name, v in a["state"][i].items():
            torch.testing.assert_close(b["state"][i][name], v, rtol=0, atol=0)
