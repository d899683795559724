"""OpenAI's images API: ``POST /v1/images/generations`` (and ``GET /v1/models``).

Request keys: ``prompt``, ``n``, ``size`` ("WxH" or "auto": the model's size), ``response_format``
(``b64_json``, or ``url`` pointing at this server's ``/view``), ``model`` (a name this server was
started with; absent: the selected one), and ldm's ``seed`` (absent: random); other keys
(quality, style, user, ...) are accepted and ignored. Errors use OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import re
import time
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from ldm.errors import LdmError
from ldm.serve import jobs
from ldm.serve.config import LimitError
from ldm.serve.worker import Job, QueueFull

_SIZE = re.compile(r"^(\d{1,6})x(\d{1,6})$")


class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    n: int | None = 1
    size: str | None = None
    response_format: str | None = "b64_json"
    model: str | None = None
    seed: int | None = None  # ldm's addition (send it through the client's extra_body)


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          kind: str = "invalid_request_error") -> JSONResponse:  # fmt: skip
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def build_job(req: ImagesRequest, server) -> Job:
    if req.response_format not in (None, "b64_json", "url"):
        raise LdmError(f"response_format {req.response_format!r}: use 'b64_json' or 'url'")
    width = height = None
    if req.size not in (None, "auto"):
        m = _SIZE.match(req.size)
        if m is None:
            raise LdmError(f"size {req.size!r}: expected 'WIDTHxHEIGHT' or 'auto'")
        width, height = int(m.group(1)), int(m.group(2))
    n = 1 if req.n is None else req.n
    server.config.limits.check(width=width, height=height, batch=1, count=n, prompts=[req.prompt])
    model = server.models.resolve(req.model, "model")
    seed = jobs.seeds_for(req.seed)
    # n images in batches of at most --max-batch: image k gets seed + k whatever the split
    size = min(n, server.config.limits.max_batch)
    batches = [([req.prompt] * len(s), s) for s in _chunks(list(range(seed, seed + n)), size)]
    job = Job(batches, jobs.settings(width=width, height=height), model, source="openai")
    jobs.check_early(job, server.worker, server.config.limits)
    return job


def _chunks(seeds: list[int], size: int) -> list[list[int]]:
    return [seeds[i : i + size] for i in range(0, len(seeds), size)]


def router(server) -> APIRouter:
    r = APIRouter(prefix="/v1")

    @r.post("/images/generations")
    async def generations(request: Request):
        try:
            req = ImagesRequest.model_validate_json(await request.body())
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(x) for x in first["loc"]) or None
            return error(400, f"{param}: {first['msg']}", param)
        try:
            job = await asyncio.to_thread(build_job, req, server)
            result = await jobs.run_job(server.worker, job, request)
        except LimitError as e:
            return error(400, str(e), code="limit_exceeded")
        except LdmError as e:
            code = "model_not_found" if "unknown model" in str(e) else None
            return error(404 if code else 400, str(e), "model" if code else None, code)
        except QueueFull as e:
            return error(503, str(e), kind="server_error", code="queue_full")
        data = []
        for image in result.images:
            if req.response_format == "url":
                query = urlencode({"filename": image.name, "type": "output"})
                data.append({"url": f"{request.base_url}view?{query}", "revised_prompt": None})
            else:
                data.append({"b64_json": image.b64, "revised_prompt": None})
        return {"created": int(time.time()), "data": data}

    @r.get("/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "ldm"}
            for name in server.models.names
        ]}  # fmt: skip

    return r
