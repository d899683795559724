"""The server's settings and request limits, checked before any allocation.

Each limit refusal names its limit and the flag that raises it; the protocols turn the LdmError
into their own 4xx shape. The body-size limit is enforced by ``ldm.serve.security`` before a
request body is parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ldm.errors import LdmError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class LimitError(LdmError):
    """A request over one of the server's limits (a 4xx naming it)."""


@dataclass
class Limits:
    max_pixels: int = 2048 * 2048  # width x height of one image (--max-pixels)
    max_side: int = 4096  # either side in pixels (--max-size, as ldm txt2img)
    max_steps: int = 150  # sampler steps (--max-steps)
    max_batch: int = 8  # images in one pipeline call: A1111 batch_size (--max-batch)
    max_images: int = 16  # images per request: batch_size x n_iter, OpenAI n (--max-images)
    max_body: int = 32 << 20  # request body bytes (--max-body-mb)
    max_prompt: int = 20_000  # characters of a prompt or negative prompt (--max-prompt-chars)

    def check(self, *, width=None, height=None, steps=None, batch=1, count=1, prompts=()) -> None:
        """Raise LimitError for the first value over its limit (sizes None: the model's)."""
        for name, side in (("width", width), ("height", height)):
            if side is not None and side > self.max_side:
                raise LimitError(f"{name} {side} is over the server's limit of {self.max_side} "
                                 "pixels (--max-size)")  # fmt: skip
        if width is not None and height is not None and width * height > self.max_pixels:
            raise LimitError(f"width x height {width}x{height} is over the server's limit of "
                             f"{self.max_pixels} pixels (--max-pixels)")  # fmt: skip
        if steps is not None and steps > self.max_steps:
            raise LimitError(f"steps {steps} is over the server's limit of {self.max_steps} "
                             "(--max-steps)")  # fmt: skip
        if batch > self.max_batch:
            raise LimitError(f"batch size {batch} is over the server's limit of {self.max_batch} "
                             "(--max-batch)")  # fmt: skip
        if batch < 1 or count < 1:
            raise LimitError(f"batch size and count must be >= 1, got {batch} and {count}")
        if batch * count > self.max_images:
            raise LimitError(f"{batch * count} images (batch size x count) is over the server's "
                             f"limit of {self.max_images} per request (--max-images)")  # fmt: skip
        for text in prompts:
            if text is not None and len(text) > self.max_prompt:
                raise LimitError(f"a prompt of {len(text)} characters is over the server's limit "
                                 f"of {self.max_prompt} (--max-prompt-chars)")  # fmt: skip


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    auth: tuple[str, str] | None = None  # --api-auth user:pass (HTTP Basic)
    token: str | None = None  # --api-token (Authorization: Bearer)
    cors_origins: list[str] = field(default_factory=list)  # --cors-allow-origins
    queue_size: int = 8
    outdir: Path = Path("outputs/serve")
    limits: Limits = field(default_factory=Limits)

    def check(self) -> None:
        """Anything but a loopback address needs credentials (the server runs code on request)."""
        if self.host not in LOCAL_HOSTS and self.auth is None and self.token is None:
            raise LdmError(f"--host {self.host} / --listen serves other machines: it needs "
                           "--api-auth user:pass or --api-token TOKEN")  # fmt: skip
        if self.token is not None and not re.fullmatch(r"[A-Za-z0-9._~+/=-]{8,}", self.token):
            raise LdmError("--api-token must be at least 8 characters of A-Z a-z 0-9 . _ ~ + / = -")
        if self.queue_size < 1:
            raise LdmError(f"--queue-size must be >= 1, got {self.queue_size}")


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise LdmError("--api-auth must be user:password, both non-empty")
    return user, password
