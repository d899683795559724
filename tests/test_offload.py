"""ldm.offload: the hooks move the parts (model) or modules (sequential) in the right order, one
at a time, and home after the call; images equal those without offload; hooks come off cleanly;
the CPU device refuses it. No GPU here: the "device" is the CPU under another name (cpu:0,
which copies weights for real) or a recording stand-in for the one function that moves them.
The GPU test (marked) measures peak device memory with and without offload."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from tiny_flux import make_tiny_flux, tiny_flux_dev  # noqa: F401 (fixture)

from ldm import offload
from ldm.cli import main
from ldm.errors import LdmError
from ldm.pipeline import load_pipeline

DEVICE, HOME = torch.device("cpu", 0), torch.device("cpu")  # "the accelerator", "CPU RAM"
SETTINGS = dict(steps=2, height=32, width=32)
BF16 = torch.bfloat16


def _image(pipe, prompt="a red circle", seed=1, **kw):
    (out,) = pipe([prompt], [seed], **{**SETTINGS, **kw})
    return np.asarray(out.image), out.record


def _pipe(folder, mode=None):
    pipe = load_pipeline(folder, accel="off")
    if mode:
        offload.enable_offload(pipe, mode, DEVICE)
    return pipe


class Where:
    """Replaces ``offload._to``: moves nothing, remembers where each weight was sent."""

    def __init__(self):
        self.at: dict[int, torch.device] = {}

    def __call__(self, tensor, device):
        self.at[tensor.data_ptr()] = device
        return tensor

    def on_device(self, module, recurse=True) -> list[bool]:
        tensors = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
        return [self.at.get(t.data_ptr()) == DEVICE for t in tensors]


def _watch(pipe, check) -> None:
    """Call ``check(part_name, module)`` before every forward of every module of every part,
    after the offload hooks (hooks run in the order they were registered)."""
    for name, part in pipe.offload.parts.items():
        for module in part.modules():
            module.register_forward_pre_hook(lambda m, a, n=name: check(n, m))


@pytest.mark.parametrize("folder", ["tiny_flux_dev", "tiny_sd1"])
def test_model_mode_one_part_on_the_device_at_a_time(folder, request, monkeypatch):
    where = Where()
    monkeypatch.setattr(offload, "_to", where)
    pipe = _pipe(request.getfixturevalue(folder), "model")
    parts = pipe.offload.parts
    seen = []

    ptrs = {n: [t.data_ptr() for t in (*p.parameters(), *p.buffers())] for n, p in parts.items()}

    def check(name, module):
        # in full where the part changes, by each part's first tensor elsewhere (fast)
        full = not seen or seen[-1] != name
        on = {n: [where.at.get(p) == DEVICE for p in (ptrs[n] if full else ptrs[n][:1])]
              for n in parts}  # fmt: skip
        resident = [n for n in parts if any(on[n])]
        assert resident == [name], f"{type(module).__name__} of {name} ran with {resident}"
        assert all(on[name])  # the whole part, not some of it
        if full:
            seen.append(name)

    _watch(pipe, check)
    _image(pipe)
    texts = [n for n in parts if n.startswith("text_encoder")]
    assert seen == [*texts, "unet", "vae"]  # encode, sample (every step, one visit), decode
    assert not any(any(where.on_device(part)) for part in parts.values())  # all home after
    assert pipe.offload.resident == []


def test_sequential_mode_one_module_at_a_time(tiny_flux_dev, monkeypatch):  # noqa: F811
    where = Where()
    monkeypatch.setattr(offload, "_to", where)
    pipe = _pipe(tiny_flux_dev, "sequential")
    parts = pipe.offload.parts
    shells = {id(m) for part in parts.values() for m in offload._shells(part)}
    ran = []

    def check(name, module):
        if next(module.children(), None) is not None or not where.on_device(module):
            return  # containers: their leaves are checked
        assert all(where.on_device(module, recurse=False)), type(module).__name__
        own = {t.data_ptr() for t in (*module.parameters(), *module.buffers())}  # T5: ties
        for part in parts.values():
            for other in part.modules():
                if other is not module and id(other) not in shells:
                    tensors = [*other.parameters(recurse=False), *other.buffers(recurse=False)]
                    assert not any(
                        where.at.get(t.data_ptr()) == DEVICE
                        for t in tensors
                        if t.data_ptr() not in own
                    ), (module, other)
        ran.append(module)

    _watch(pipe, check)
    _image(pipe)
    holders = [m for part in parts.values() for m in offload._holders(part)]
    leaves = [m for m in holders if next(m.children(), None) is None]
    assert len(ran) > len(leaves)  # every step visits the network's leaves again
    assert not any(any(where.on_device(p)) for p in parts.values())


@pytest.mark.parametrize("mode", ["model", "sequential"])
@pytest.mark.parametrize("folder", ["tiny_flux_dev", "tiny_sd1"])
def test_offloaded_images_equal_plain_ones(folder, mode, request):
    """Real copies between "devices" (cpu:0 and cpu): bit-exact images, true CFG included."""
    path = request.getfixturevalue(folder)
    kw = dict(negative_prompt="blurry") | (dict(true_cfg_scale=2.0) if "flux" in folder else {})
    plain, _ = _image(_pipe(path), **kw)
    pipe = _pipe(path, mode)
    ours, record = _image(pipe, **kw)
    assert np.array_equal(ours, plain)
    assert record["offload"] == mode and pipe.offload.resident == []
    again, _ = _image(pipe, **kw)  # a second call starts from home again
    assert np.array_equal(again, plain)


def test_hooks_come_off(tiny_sd1):
    pipe = _pipe(tiny_sd1)
    modules = [m for part in (pipe.unet, pipe.vae, pipe.parts.text_encoder) for m in part.modules()]

    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules)

    before, plain = hooks(), _image(pipe)[0]
    for mode in ("model", "sequential"):
        offload.enable_offload(pipe, mode, DEVICE)
        assert hooks() > before
        offload.enable_offload(pipe, "none")
        assert hooks() == before and pipe.offload is None
    ours, record = _image(pipe)
    assert np.array_equal(ours, plain) and record["offload"] == "none"


def test_fp32_vae_copy_for_nan_retries(tiny_sd1):
    """A copy made after offloading carries the hooks; model mode moves it as its own part."""

    def run(mode):
        pipe = load_pipeline(tiny_sd1, dtype="bf16", accel="off")
        if mode:
            offload.enable_offload(pipe, mode, DEVICE)

        def broken(module, args, out):  # the bf16 VAE's pixels are NaN (the fp32 copy's not)
            return out.index_fill(0, torch.tensor([0]), float("nan")) if out.dtype == BF16 else out

        pipe.vae.decoder.register_forward_hook(broken)
        out = pipe(["a"], [3], **SETTINGS)[0]
        assert out.record["nan_retry_fp32"] and pipe._vae_fp32 is not None
        return np.asarray(out.image), pipe

    plain, _ = run(None)
    for mode in ("model", "sequential"):
        ours, pipe = run(mode)
        assert np.array_equal(ours, plain) and pipe.offload.resident == []


def test_the_cpu_device_refuses_offload(tiny_sd1, capsys):
    with pytest.raises(LdmError, match="needs a GPU"):
        load_pipeline(tiny_sd1, device="cpu", offload="model")
    with pytest.raises(LdmError, match="choose one of"):
        offload.check_offload("disk", torch.device("cuda"))
    rc = main(["txt2img", "--model", str(tiny_sd1), "--prompt", "a", "--device", "cpu",
               "--offload", "sequential"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "needs a GPU" in err


def test_offload_refuses_inductor(tiny_sd1):
    pipe = load_pipeline(tiny_sd1, accel="inductor")
    pipe.device = torch.device("cuda")  # only the check runs: nothing is moved
    with pytest.raises(LdmError, match="inductor"):
        pipe.enable_offload("model")


# ---- on a real GPU (opt-in) -----------------------------------------------------------------
GPU = os.environ.get("LDM_TEST_DEVICE", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(GPU == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_device_memory_with_offload(tmp_path):
    """Peak allocated GPU memory: none >= all parts, model < all parts (one part at a time),
    sequential < the network's weights (one module at a time); images within 2/255."""
    wide = dict(
        num_layers=3,
        num_single_layers=6,
        num_attention_heads=4,
        attention_head_dim=32,
        axes_dims_rope=(8, 12, 12),
    )  # fmt: skip  (a few MB of transformer weights)
    folder = make_tiny_flux(tmp_path / "flux", transformer=wide)
    peaks, images = {}, {}
    for mode in ("none", "model", "sequential"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        pipe = load_pipeline(folder, device="cuda", dtype="fp32", offload=mode)
        images[mode], _ = _image(pipe)
        peaks[mode] = torch.cuda.max_memory_allocated() - base
        sizes = {n: _nbytes(getattr(pipe.parts, n)) for n in offload.PART_NAMES
                 if getattr(pipe.parts, n, None) is not None}  # fmt: skip
        del pipe
    assert peaks["none"] >= sum(sizes.values())
    assert peaks["model"] < sum(sizes.values())
    assert peaks["sequential"] < sizes["unet"] < peaks["model"]
    for mode in ("model", "sequential"):
        assert np.abs(images[mode].astype(int) - images["none"]).max() <= 2


def _nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
