"""A1111's ``/sdapi/v1`` API (``modules/api/api.py`` and ``models.py`` of stable-diffusion-webui).

Request models accept and ignore keys they do not know (the ``webuiapi`` client sends all of its
keys, ``null`` included); images go out as raw base64 PNG and come in with or without a ``data:``
prefix; ``info`` is a JSON string with A1111's keys. Sampler and scheduler names come from the
sampler table; an unknown one is a 422 naming the valid ones (A1111 would silently substitute).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

from fastapi import APIRouter, HTTPException, Request
from PIL import ImageOps
from pydantic import BaseModel, ConfigDict

from ldm.errors import LdmError
from ldm.infotext import SCHEDULE_TO_A1111, a1111_sampler_names, ldm_sampler_names
from ldm.sampling.samplers import SPECS, names_help, resolve_sampler
from ldm.serve import jobs
from ldm.serve.worker import Job, JobResult, QueueFull

# A1111 >= 1.9 scheduler names (modules/sd_schedulers.py) ldm has, "automatic" first
SCHEDULERS = [("automatic", "Automatic")] + [
    (label.lower().replace(" ", "_"), label) for key, label in SCHEDULE_TO_A1111.items()
    if key != "default"
]  # fmt: skip


class GenerationRequest(BaseModel):
    """The txt2img / img2img keys ldm reads; every other key is accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    prompt: str | None = ""
    negative_prompt: str | None = ""
    seed: int | None = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111's older name for sampler_name
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    eta: float | None = None
    override_settings: dict | None = None
    send_images: bool | None = True
    # img2img
    init_images: list[str] | None = None
    mask: str | None = None
    inpainting_mask_invert: int | None = 0
    denoising_strength: float | None = None
    include_init_images: bool | None = False


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str


def sampler_and_schedule(sampler: str | None, scheduler: str | None) -> tuple:
    """A1111 sampler_name + scheduler -> ldm (sampler, schedule); None: the family's."""
    if sampler is None:
        return None, _schedule(scheduler, None)
    try:
        name, implied = resolve_sampler(sampler)
    except LdmError:
        raise LdmError(
            f"unknown sampler_name {sampler!r}; valid: {', '.join(names_help())}"
        ) from None
    return name, implied or _schedule(scheduler, name)


def _schedule(scheduler: str | None, sampler: str | None) -> str | None:
    if scheduler is None:
        return None
    key = scheduler.strip().replace("_", " ")
    if key.lower() == "automatic" and sampler is None:
        return None  # the family's sampler with its own schedule
    schedule = ldm_sampler_names(sampler or "euler", key)[1]
    if schedule not in SCHEDULE_TO_A1111:
        valid = ", ".join(name for name, _ in SCHEDULERS)
        raise LdmError(f"unknown scheduler {scheduler!r}; valid: {valid}")
    return schedule


def build_job(req: GenerationRequest, server, img2img: bool) -> Job:
    """The request as a worker Job (checked: limits, names, images, pipeline settings)."""
    limits = server.config.limits
    overrides = req.override_settings or {}
    model = server.models.resolve(overrides.get("sd_model_checkpoint"), "sd_model_checkpoint")
    sampler, schedule = sampler_and_schedule(req.sampler_name or req.sampler_index, req.scheduler)
    batch_size, count = req.batch_size or 1, req.n_iter or 1
    limits.check(width=req.width, height=req.height, steps=req.steps, batch=batch_size,
                 count=count, prompts=[req.prompt, req.negative_prompt])  # fmt: skip
    init_image = mask = None
    if img2img:
        if not req.init_images:
            raise LdmError("img2img needs init_images (a list of base64 images)")
        init_image = jobs.decode_image(req.init_images[0], limits, "init_images[0]")
        if req.mask:
            mask = jobs.decode_image(req.mask, limits, "mask").convert("L")
            if req.inpainting_mask_invert:
                mask = ImageOps.invert(mask)
    seed = jobs.seeds_for(req.seed)
    settings = jobs.settings(
        negative_prompt=req.negative_prompt, steps=req.steps, guidance_scale=req.cfg_scale,
        sampler=sampler, schedule=schedule, eta=req.eta, width=req.width, height=req.height,
        clip_skip=overrides.get("CLIP_stop_at_last_layers"), init_image=init_image, mask=mask,
        strength=req.denoising_strength if img2img else None,
    )  # fmt: skip
    job = Job(jobs.batches(req.prompt or "", seed, batch_size, count), settings, model)
    jobs.check_early(job, server.worker, limits)
    return job


def info(result: JobResult, job: Job, server) -> dict:
    """A1111's ``info`` object (``modules/processing.py: Processed.js``) for the images made."""
    records = [image.record for image in result.images]
    first = records[0] if records else None
    seeds = [r["seed"] for r in records] or [job.batches[0][1][0]]
    sampler, schedule = (a1111_sampler_names(first["sampler"], first["schedule"])
                         if first else (None, None))  # fmt: skip
    model = job.model
    return {
        "prompt": job.batches[0][0][0], "all_prompts": [r["prompt"] for r in records],
        "negative_prompt": job.settings.get("negative_prompt", ""),
        "all_negative_prompts": [r["negative_prompt"] for r in records],
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": first and first["width"],
        "height": first and first["height"], "sampler_name": sampler,
        "cfg_scale": first and first["guidance_scale"], "steps": first and first["steps"],
        "batch_size": len(job.batches[0][1]), "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model,
        "sd_model_hash": server.models.hash(model), "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": first and first.get("strength"),
        "extra_generation_params": {"Schedule type": schedule} if schedule else {},
        "index_of_first_image": 0, "infotexts": [image.infotext for image in result.images],
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": first["clip_skip"] if first else 1,
        "is_using_inpainting_conditioning": False, "interrupted": result.interrupted,
        "version": f"ldm {first['ldm_version']}" if first else "ldm",
    }  # fmt: skip


def router(server) -> APIRouter:
    """A1111's /sdapi/v1: generation, job control, and what the server has."""
    r = APIRouter(prefix="/sdapi/v1")
    _generation_routes(r, server)
    _control_routes(r, server)
    _info_routes(r, server)
    return r


def _generation_routes(r: APIRouter, server) -> None:
    async def generate(req: GenerationRequest, request: Request, img2img: bool):
        try:
            job = await asyncio.to_thread(build_job, req, server, img2img)
            result = await jobs.run_job(server.worker, job, request)
        except LdmError as e:
            raise HTTPException(422, str(e)) from None
        except QueueFull as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "5"}) from None
        parameters = req.model_dump()
        parameters.update(init_images=None, mask=None)  # as A1111 without include_init_images
        images = [image.b64 for image in result.images] if req.send_images is not False else []
        return {"images": images, "parameters": parameters,
                "info": json.dumps(info(result, job, server))}  # fmt: skip

    @r.post("/txt2img")
    async def txt2img(req: GenerationRequest, request: Request):
        return await generate(req, request, img2img=False)

    @r.post("/img2img")
    async def img2img(req: GenerationRequest, request: Request):
        return await generate(req, request, img2img=True)


def _control_routes(r: APIRouter, server) -> None:
    @r.get("/progress")
    async def progress(skip_current_image: bool = False):
        return server.progress(skip_current_image)

    @r.post("/interrupt")
    async def interrupt():
        server.worker.interrupt()
        return {}

    @r.post("/skip")
    async def skip():
        server.worker.skip()
        return {}

    @r.post("/options")
    async def set_options(options: dict):
        unknown = sorted(set(options) - {"sd_model_checkpoint"})
        if unknown:
            raise HTTPException(422, f"options: only sd_model_checkpoint can be set, not "
                                f"{', '.join(unknown)}")  # fmt: skip
        try:
            server.models.select(str(options["sd_model_checkpoint"]))
        except LdmError as e:
            raise HTTPException(422, str(e)) from None
        return None


def _info_routes(r: APIRouter, server) -> None:
    @r.get("/samplers")
    async def samplers():
        return [{"name": s.a1111, "aliases": [s.name, *s.aliases],
                 "options": {"scheduler": s.a1111_schedule}} for s in SPECS]  # fmt: skip

    @r.get("/schedulers")
    async def schedulers():
        return [{"name": name, "label": label, "aliases": None, "default_rho": -1,
                 "need_inner_model": False} for name, label in SCHEDULERS]  # fmt: skip

    @r.get("/sd-models")
    async def sd_models():
        m = server.models
        return [{"title": m.title(n), "model_name": n, "hash": m.hash(n), "sha256": None,
                 "filename": m.paths[n].name, "config": None} for n in m.names]  # fmt: skip

    @r.get("/options")
    async def get_options():
        m = server.models
        return {"sd_model_checkpoint": m.title(m.selected), "sd_checkpoint_hash": None,
                "CLIP_stop_at_last_layers": 1, "samples_format": "png"}  # fmt: skip

    @r.post("/png-info")
    async def png_info(req: PngInfoRequest):
        try:
            return await asyncio.to_thread(read_png_info, req.image, server.config.limits)
        except LdmError as e:
            raise HTTPException(422, str(e)) from None

    @r.get("/loras")
    async def loras():
        pipe = server.models.loaded(server.models.selected)
        merged = pipe.loras if pipe is not None else []
        return [{"name": x["name"], "alias": x["name"], "metadata": {}} for x in merged]

    @r.get("/scripts")
    async def scripts():  # webuiapi asks at start which extensions exist: none
        return {"txt2img": [], "img2img": []}


def read_png_info(data: str, limits) -> dict:
    """A1111's png-info: the infotext, the other text chunks, and the parsed parameters."""
    from ldm.infotext import parse_infotext

    image = jobs.decode_image(data, limits, "image")
    text = {k: v for k, v in (getattr(image, "text", None) or image.info).items()
            if isinstance(v, str)}  # fmt: skip
    infotext = text.pop("parameters", "")
    params = parse_infotext(infotext) if infotext else {}
    return {"info": infotext, "items": text, "parameters": a1111_parameters(params)}


def a1111_parameters(p: dict) -> dict:
    """ldm's parsed infotext -> A1111's ``parse_generation_parameters`` keys."""
    if not p:
        return {}
    out = {"Prompt": p.get("prompt", ""), "Negative prompt": p.get("negative_prompt", "")}
    if p.get("sampler"):
        try:
            out["Sampler"], out["Schedule type"] = a1111_sampler_names(
                p["sampler"], p.get("schedule", "default")
            )
        except LdmError:
            out["Sampler"] = p["sampler"]
    labels = {"steps": "Steps", "guidance_scale": "CFG scale", "seed": "Seed", "width": "Size-1",
              "height": "Size-2", "model_hash": "Model hash", "model": "Model",
              "denoising_strength": "Denoising strength", "eta": "Eta", "clip_skip": "Clip skip",
              "rng": "RNG", "version": "Version"}  # fmt: skip
    out.update({label: str(p[k]) for k, label in labels.items() if p.get(k) is not None})
    out.update(p.get("extra") or {})
    return out


def preview_b64(image) -> str | None:
    if image is None:
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
