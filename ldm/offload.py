"""Weights kept in CPU RAM and moved to the accelerator only while they run (``--offload``).

The two modes diffusers users know (``enable_model_cpu_offload``,
``enable_sequential_cpu_offload``), applied to a loaded pipeline's parts by forward hooks, so the
model files know nothing of them and ``remove()`` leaves the modules as they were:

- ``model``: a part (a text encoder, the network, the VAE) comes to the device whole when one of
  its modules runs, after the part that was there has gone back: one part at a time, peak device
  memory = the largest part + activations. A part stays until another is needed (the network
  runs every step) and ``release()`` sends the last one home after the call.
- ``sequential``: each module that holds weights comes to the device for its own forward and
  leaves after it: peak = the largest such module + activations, for any size of GPU, at the
  price of moving every weight over the bus at every step.

Offloading trades bus time for device memory; on a CPU device there is nothing to trade (the
weights are in RAM already), so the pipeline refuses it there (``check_offload``); memory figures
per family and machine: docs/flux.md.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ldm.errors import LdmError

MODES = ("none", "model", "sequential")
PART_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "vae")


def check_offload(mode: str | None, device: torch.device) -> str:
    """The mode, checked: known, and only with an accelerator (one-line LdmError otherwise)."""
    mode = mode or "none"
    if mode not in MODES:
        raise LdmError(f"--offload {mode!r}: choose one of {', '.join(MODES)}")
    if mode != "none" and torch.device(device).type == "cpu":
        raise LdmError(
            f"--offload {mode}: on the CPU the weights are in RAM already; offloading needs a "
            "GPU (on the CPU, --dtype bf16 halves the RAM)"
        )
    return mode


def enable_offload(pipe, mode: str, device: torch.device | None = None) -> Offload | None:
    """Offload ``pipe``'s parts in ``mode`` (replacing any earlier offload); "none" removes it.

    ``device``: where the parts run (default ``pipe.device``); it may be the CPU itself, which
    moves nothing and is how the tests check the hooks. Sets and returns ``pipe.offload``.
    """
    if mode not in MODES:
        raise LdmError(f"--offload {mode!r}: choose one of {', '.join(MODES)}")
    if getattr(pipe, "offload", None) is not None:
        pipe.offload.remove()
    pipe.offload = None
    if mode != "none":
        parts = {n: getattr(pipe.parts, n) for n in PART_NAMES if getattr(pipe.parts, n, None)}
        pipe.offload = Offload(parts, mode, device or pipe.device)
    return pipe.offload


class Offload:
    """Forward hooks that move ``parts`` between ``home`` (CPU RAM) and ``device``."""

    def __init__(self, parts: dict[str, nn.Module], mode: str, device, home="cpu"):
        if mode not in MODES[1:]:
            raise ValueError(f"mode {mode!r}: expected 'model' or 'sequential'")
        self.mode = mode
        self.device, self.home = torch.device(device), torch.device(home)
        self.parts = dict(parts)  # name -> module, the units of "model" mode
        self._handles: list = []
        self._resident: dict[nn.Module, str] = {}  # on the device now -> its name
        self._shells_in: set[str] = set()  # parts whose shells are on the device (sequential)
        self._owner: dict[nn.Module, str] = {}  # module -> the part it belongs to
        self._name: dict[nn.Module, str] = {}  # module -> qualified name (reports, tests)
        for part_name, part in self.parts.items():
            for name, module in part.named_modules():
                self._owner.setdefault(module, part_name)
                self._name.setdefault(module, f"{part_name}.{name}".rstrip("."))
        self.release()  # every part starts at home
        for part in self.parts.values():
            if mode == "model":
                self._hook_model(part)
            else:
                self._hook_sequential(part)

    # ---- what is where ------------------------------------------------------------------------
    @property
    def resident(self) -> list[str]:
        """Names of the parts ("model") or modules ("sequential") on the device now."""
        return list(self._resident.values())

    def release(self) -> None:
        """Send everything home (after a call, or an error in the middle of one)."""
        for module in list(self._resident):
            self._send_home(module)
        for part_name in self.parts if self.mode == "model" else ():
            _move_module(self.parts[part_name], self.home)  # a part loaded onto the device
        for part_name in list(self._shells_in) if self.mode == "sequential" else ():
            for shell in _shells(self.parts[part_name]):
                _move_own(shell, self.home)
            self._shells_in.discard(part_name)
        if self.mode == "sequential":
            for part in self.parts.values():
                for module in _holders(part):
                    _move_own(module, self.home)

    def remove(self) -> None:
        """Take the hooks off and leave every part at home."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.release()

    # ---- model mode: a part at a time -------------------------------------------------------
    def _hook_model(self, part: nn.Module) -> None:
        # the part's own forward and its children's: the VAE is entered through decode/encode,
        # which call its children (post_quant_conv, decoder, ...), never its forward
        def pre(module, args, kwargs):
            self._bring(module)
            return self._inputs(args, kwargs)

        for module in (part, *part.children()):
            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    def _bring(self, module: nn.Module) -> None:
        """Put ``module``'s part on the device, the resident one home first. A module of no
        known part (a copy, e.g. the pipeline's fp32 VAE for NaN retries) counts as its own."""
        part = self.parts.get(self._owner.get(module), module)
        if part in self._resident:
            return
        for other in list(self._resident):
            self._send_home(other)
        _move_module(part, self.device)
        self._resident[part] = self._owner.get(module) or type(module).__name__

    def _send_home(self, module: nn.Module) -> None:
        if self.mode == "model":
            _move_module(module, self.home)
        else:
            _move_own(module, self.home)
        self._resident.pop(module, None)

    # ---- sequential mode: a module at a time -------------------------------------------------
    def _hook_sequential(self, part: nn.Module) -> None:
        """Leaves that hold weights come and go around their forward; the few modules that own
        a tensor beside children (position tables, CLIP's position ids) come with the part's
        first module and stay until ``release`` (they may be read outside their forward)."""

        def enter(module, args, kwargs):
            self._enter_part(self._owner.get(module))
            return self._inputs(args, kwargs)

        def pre(module, args, kwargs):
            self._enter_part(self._owner.get(module))
            _move_own(module, self.device)
            self._resident[module] = self._name.get(module) or type(module).__name__
            return self._inputs(args, kwargs)

        def post(module, args, output):
            self._send_home(module)

        self._handles.append(part.register_forward_pre_hook(enter, with_kwargs=True))
        for module in _holders(part):
            if next(module.children(), None) is None:  # a leaf
                self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                self._handles.append(module.register_forward_hook(post))
            else:
                self._handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))

    def _enter_part(self, part_name: str | None) -> None:
        if part_name is None or part_name in self._shells_in:
            return
        for shell in _shells(self.parts[part_name]):
            _move_own(shell, self.device)
        self._shells_in.add(part_name)

    def _inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Tensor arguments to the device (token ids come from the CPU: the text encoders put
        them where their weights are, which is home until the hook runs)."""
        move = lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


# ---- moving weights -----------------------------------------------------------------------------
def _holders(part: nn.Module) -> Iterable[nn.Module]:
    """The modules of ``part`` that own parameters or buffers themselves."""
    for module in part.modules():
        if module._parameters or module._buffers:
            yield module


def _shells(part: nn.Module) -> Iterable[nn.Module]:
    """Weight holders that also have children (moved with the part in sequential mode)."""
    return [m for m in _holders(part) if next(m.children(), None) is not None]


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The one place weights cross devices (tests record the moves by replacing it); a tensor
    already there is returned as it is."""
    return tensor.to(device)


def _move_own(module: nn.Module, device: torch.device) -> None:
    """``module``'s own parameters and buffers (not its children's) to ``device``, in place:
    the Parameter objects stay, so optimisers, LoRA merges and ties keep pointing at them."""
    for p in module._parameters.values():
        if p is not None:
            with _mode_of(p):
                p.data = _to(p.data, device)
    for name, b in module._buffers.items():
        if b is not None:
            with _mode_of(b):
                module._buffers[name] = _to(b, device)


def _mode_of(tensor: torch.Tensor):
    """Move a weight in the mode it was made in: the pipeline runs in inference mode, where a
    copy would become an inference tensor, but the loaded weights must stay ordinary tensors
    (training and LoRA merges use them); copies made in inference mode (the pipeline's fp32
    VAE) stay inference tensors."""
    return torch.inference_mode(tensor.is_inference())


def _move_module(module: nn.Module, device: torch.device) -> None:
    for m in module.modules():
        _move_own(m, device)
