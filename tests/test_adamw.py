"""ldm's AdamW: torch's fused kernel, fed flat views of channels_last tensors."""

import copy

import pytest
import torch

from ldm.train.adamw import AdamW, fused_ok


def params_in_both_layouts(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(8, 6, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    return [
        torch.nn.Parameter(conv),
        torch.nn.Parameter(torch.randn(8, 6, 3, 3, generator=g)),
        torch.nn.Parameter(torch.randn(8, generator=g)),
    ]


def run(params, optimizer, steps: int = 5) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:  # gradients in the parameter's own layout, as autograd leaves them
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))
        optimizer.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_matches_torch_single_tensor_adamw_in_every_layout(weight_decay):
    ours, ref = params_in_both_layouts(), params_in_both_layouts()
    opt = AdamW(ours, lr=1e-2, weight_decay=weight_decay)
    assert opt.defaults["fused"]
    run(ours, opt)
    run(ref, torch.optim.AdamW(ref, lr=1e-2, weight_decay=weight_decay, foreach=False))
    for po, pr in zip(ours, ref, strict=True):
        torch.testing.assert_close(po, pr, rtol=1e-6, atol=1e-6)
        assert po.stride() == pr.stride()  # channels_last stays channels_last
    state = opt.state[ours[0]]
    assert state["exp_avg"].is_contiguous(memory_format=torch.channels_last)


def test_the_fused_kernel_sees_only_contiguous_tensors(monkeypatch):
    """What makes it fast: no copy to contiguous and back inside the kernel."""
    seen = []
    real = torch._fused_adamw_

    def spy(params, grads, exp_avgs, exp_avg_sqs, *args, **kwargs):
        seen.extend(t.is_contiguous() for ts in (params, grads, exp_avgs, exp_avg_sqs) for t in ts)
        return real(params, grads, exp_avgs, exp_avg_sqs, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", spy)
    params = params_in_both_layouts()
    run(params, AdamW(params, lr=1e-2), steps=2)
    assert len(seen) == 2 * 4 * len(params) and all(seen)


def test_state_dict_moves_between_torch_and_ldm():
    """A checkpoint's optimizer state loads either way (resuming across versions)."""
    a, b = params_in_both_layouts(), params_in_both_layouts()
    torch_opt = torch.optim.AdamW(a, lr=1e-2, foreach=False)
    run(a, torch_opt, steps=2)
    for pa, pb in zip(a, b, strict=True):
        pb.data.copy_(pa.data)
    ours = AdamW(b, lr=1e-2)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # no shared moments
    assert all(group["fused"] for group in ours.param_groups)  # torch's said fused=None
    run(a, torch_opt, steps=2)
    run(b, ours, steps=2)
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)


def test_param_groups_and_tensors_off_the_kernel():
    """Param groups work; tensors the fused kernel cannot take fall back to torch's default."""
    a, b = params_in_both_layouts()[:2]
    opt = AdamW([{"params": [a]}, {"params": [b], "lr": 0.0}], lr=1e-2)
    assert opt.defaults["fused"]
    before = b.detach().clone()
    run([a, b], opt, steps=1)
    torch.testing.assert_close(b, before)  # lr 0 in its group: unchanged
    assert not fused_ok([a, torch.ones(3, dtype=torch.int64)])
    assert not fused_ok([a, torch.ones(3, device="meta")]) and not fused_ok([])


def test_gradients_and_moments_in_another_layout_are_aligned_first():
    """torch 2.14's fused CPU kernel miscomputes a gradient laid out unlike its parameter."""
    ours, ref = params_in_both_layouts(), params_in_both_layouts()
    opt = AdamW(ours, lr=1e-2)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        for po, pr in zip(ours, ref, strict=True):
            grad = torch.randn(pr.shape, generator=g)  # contiguous, even for channels_last
            po.grad, pr.grad = grad, grad.clone()
        opt.step()
        ref_opt.step()
        if step == 0:  # moments restored in another layout, as from some checkpoints
            state = opt.state[ours[0]]
            state["exp_avg"] = state["exp_avg"].contiguous()
    for po, pr in zip(ours, ref, strict=True):
        torch.testing.assert_close(po, pr, rtol=1e-6, atol=1e-6)
    assert opt.state[ours[0]]["exp_avg"].is_contiguous(memory_format=torch.channels_last)


def test_takes_what_torch_adamw_takes():
    model = torch.nn.Linear(4, 3)
    for params in (model.parameters(), model.named_parameters(), [{"params": model.parameters()}]):
        opt = AdamW(params, lr=1e-2)
        assert sum(len(group["params"]) for group in opt.param_groups) == 2
    assert not AdamW(model.parameters(), fused=False).defaults["fused"]
    assert AdamW(model.parameters(), foreach=True).defaults["foreach"]
