"""ComfyUI's default text-to-image workflow (API format) -> one worker Job, by following links.

Accepted: CheckpointLoaderSimple, CLIPTextEncode x2, EmptyLatentImage, KSampler, VAEDecode,
SaveImage, wired as ComfyUI's default graph. An input is a value or a link ``[node_id, output]``.
Anything else (another node type, another wiring, a value ldm cannot honour) is a ComfyUI-shaped
``node_errors`` entry naming it. Sampler and scheduler names go through the sampler table.
"""

from __future__ import annotations

from ldm.errors import LdmError
from ldm.sampling.samplers import SPECS, resolve_sampler
from ldm.sampling.schedules import SIGMA_SCHEDULES
from ldm.serve import jobs
from ldm.serve.worker import Job

# ComfyUI scheduler -> ldm schedule: the same names, but ComfyUI calls the checkpoint's own
# (uniform-in-timestep) spacing "normal"
SCHEDULERS = {"normal": "default"} | {
    s: s
    for s in SIGMA_SCHEDULES
    if s not in ("default", "uniform")  # ComfyUI has no uniform
}
SAMPLERS = [s.name for s in SPECS] + [a for s in SPECS for a in s.aliases if "_" in a]
# class_type -> (required inputs: name -> type, outputs)
NODES = {
    "CheckpointLoaderSimple": ({"ckpt_name": "COMBO"}, ["MODEL", "CLIP", "VAE"]),
    "CLIPTextEncode": ({"text": "STRING", "clip": "CLIP"}, ["CONDITIONING"]),
    "EmptyLatentImage": ({"width": "INT", "height": "INT", "batch_size": "INT"}, ["LATENT"]),
    "KSampler": ({"model": "MODEL", "seed": "INT", "steps": "INT", "cfg": "FLOAT",
                  "sampler_name": "COMBO", "scheduler": "COMBO", "positive": "CONDITIONING",
                  "negative": "CONDITIONING", "latent_image": "LATENT", "denoise": "FLOAT"},
                 ["LATENT"]),
    "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, ["IMAGE"]),
    "SaveImage": ({"images": "IMAGE", "filename_prefix": "STRING"}, []),
}  # fmt: skip


class WorkflowError(Exception):
    """A graph ldm does not run: ``node_errors`` in ComfyUI's shape."""

    def __init__(self, message: str, node_errors: dict):
        super().__init__(message)
        self.message, self.node_errors = message, node_errors

    def body(self) -> dict:
        return {
            "error": {
                "type": "prompt_outputs_failed_validation",
                "message": self.message,
                "details": "",
                "extra_info": {},
            },
            "node_errors": self.node_errors,
        }


class _Graph:
    def __init__(self, prompt: dict):
        self.prompt, self.errors = prompt, {}

    def fail(self, node_id: str, kind: str, message: str) -> None:
        entry = self.errors.setdefault(node_id, {
            "errors": [], "dependent_outputs": [],
            "class_type": (self.prompt.get(node_id) or {}).get("class_type"),
        })  # fmt: skip
        entry["errors"].append({"type": kind, "message": message, "details": message,
                                "extra_info": {}})  # fmt: skip

    def value(self, node_id: str, name: str, default=None):
        inputs = self.prompt[node_id].get("inputs") or {}
        value = inputs.get(name, default)
        if isinstance(value, list):
            self.fail(node_id, "unsupported_link", f"{name}: ldm takes a value here, not a link")
            return default
        return value

    def follow(self, node_id: str, name: str, want: str, output: int = 0) -> str | None:
        """The node that input ``name`` links to, which must be a ``want`` node's ``output``."""
        link = (self.prompt[node_id].get("inputs") or {}).get(name)
        if not (isinstance(link, list) and len(link) == 2 and str(link[0]) in self.prompt):
            self.fail(node_id, "required_input_missing", f"{name}: needs a link to a {want} node")
            return None
        target = str(link[0])
        if self.prompt[target].get("class_type") != want or link[1] != output:
            self.fail(node_id, "unsupported_link", f"{name}: ldm follows only the default "
                      f"workflow here ({want} output {output})")  # fmt: skip
            return None
        return target


def parse(prompt, server) -> Job:
    """The workflow as a Job (``extra``: its SaveImage and KSampler ids); WorkflowError if not
    ours."""
    if not isinstance(prompt, dict) or not prompt:
        raise WorkflowError("the prompt must be a non-empty workflow (API format)", {})
    g = _Graph({str(k): v for k, v in prompt.items()})
    for node_id, node in g.prompt.items():
        kind = node.get("class_type") if isinstance(node, dict) else None
        if kind not in NODES:
            g.prompt[node_id] = node if isinstance(node, dict) else {}
            g.fail(node_id, "unsupported_node", f"ldm does not run node type {kind!r}; "
                   f"supported: {', '.join(NODES)}")  # fmt: skip
    saves = [i for i, n in g.prompt.items() if n.get("class_type") == "SaveImage"]
    if len(saves) != 1 or g.errors:
        if len(saves) != 1:
            for i in saves[1:] if saves else list(g.prompt)[:1]:
                g.fail(
                    i, "unsupported_graph", f"ldm runs exactly one SaveImage, found {len(saves)}"
                )
        _raise(g, saves)
    save = saves[0]
    ckpt = pos = neg = latent = None
    decode = g.follow(save, "images", "VAEDecode")
    sampler = decode and g.follow(decode, "samples", "KSampler")
    if decode and sampler:
        ckpt = g.follow(sampler, "model", "CheckpointLoaderSimple", 0)
        vae = g.follow(decode, "vae", "CheckpointLoaderSimple", 2)
        pos = g.follow(sampler, "positive", "CLIPTextEncode")
        neg = g.follow(sampler, "negative", "CLIPTextEncode")
        latent = g.follow(sampler, "latent_image", "EmptyLatentImage")
        for text in (pos, neg):
            if text and g.follow(text, "clip", "CheckpointLoaderSimple", 1) not in (ckpt, None):
                g.fail(text, "unsupported_link", "clip: must come from the KSampler's checkpoint")
        if vae not in (ckpt, None):
            g.fail(decode, "unsupported_link", "vae: must come from the KSampler's checkpoint")
    if g.errors or not (decode and sampler and ckpt and pos and neg and latent):
        _raise(g, saves)
    job = _job(g, server, ckpt, pos, neg, latent, sampler)
    if g.errors:
        _raise(g, saves)
    job.extra = {"save": save, "sampler": sampler}
    return job


def _job(g: _Graph, server, ckpt, pos, neg, latent, sampler) -> Job | None:
    try:
        model = server.models.resolve(g.value(ckpt, "ckpt_name"), "ckpt_name")
    except LdmError as e:
        g.fail(ckpt, "value_not_in_list", str(e))
        model = None
    name, schedule = g.value(sampler, "sampler_name", "euler"), g.value(sampler, "scheduler")
    try:
        name = resolve_sampler(str(name))[0]
    except LdmError:
        g.fail(sampler, "value_not_in_list", f"sampler_name {name!r}; valid: {', '.join(SAMPLERS)}")
    if schedule not in SCHEDULERS:
        g.fail(sampler, "value_not_in_list",
               f"scheduler {schedule!r}; valid: {', '.join(SCHEDULERS)}")  # fmt: skip
    if float(g.value(sampler, "denoise", 1.0) or 0) != 1.0:
        g.fail(sampler, "unsupported_value", "denoise: ldm runs text-to-image only (denoise 1.0)")
    if g.errors:
        return None
    try:
        seed = jobs.seeds_for(int(g.value(sampler, "seed", 0)))
        batch = int(g.value(latent, "batch_size", 1))
        settings = jobs.settings(
            negative_prompt=str(g.value(neg, "text", "")), steps=int(g.value(sampler, "steps", 20)),
            guidance_scale=float(g.value(sampler, "cfg", 8.0)), sampler=name,
            schedule=SCHEDULERS[schedule], width=int(g.value(latent, "width", 512)),
            height=int(g.value(latent, "height", 512)),
        )  # fmt: skip
        job = Job(jobs.batches(str(g.value(pos, "text", "")), seed, batch, 1), settings, model,
                  source="comfyui")  # fmt: skip
        jobs.check_early(job, server.worker, server.config.limits)
        return job
    except (LdmError, TypeError, ValueError) as e:
        g.fail(sampler, "invalid_input", str(e))
        return None


def _raise(g: _Graph, saves: list[str]):
    for entry in g.errors.values():
        entry["dependent_outputs"] = saves
    what = "; ".join(f"node {i} ({e['class_type']}): {e['errors'][0]['message']}"
                     for i, e in g.errors.items())  # fmt: skip
    raise WorkflowError(f"Prompt outputs failed validation: {what}", g.errors)


def object_info(server) -> dict:
    """ComfyUI's /object_info for the node types ldm accepts."""
    limits = server.config.limits
    combos = {"ckpt_name": [server.models.paths[n].name for n in server.models.names],
              "sampler_name": SAMPLERS, "scheduler": list(SCHEDULERS)}  # fmt: skip
    ranges = {"width": {"default": 512, "min": 16, "max": limits.max_side, "step": 8},
              "height": {"default": 512, "min": 16, "max": limits.max_side, "step": 8},
              "batch_size": {"default": 1, "min": 1, "max": limits.max_batch},
              "steps": {"default": 20, "min": 1, "max": limits.max_steps},
              "seed": {"default": 0, "min": 0, "max": 2**63 - 1},
              "cfg": {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1},
              "denoise": {"default": 1.0, "min": 1.0, "max": 1.0}}  # fmt: skip
    out = {}
    for kind, (inputs, outputs) in NODES.items():
        required = {}
        for name, t in inputs.items():
            if t == "COMBO":
                required[name] = [combos[name]]
            else:
                required[name] = [t, ranges.get(name, {"multiline": True} if t == "STRING" else {})]
        out[kind] = {"input": {"required": required}, "input_order": {"required": list(inputs)},
                     "output": outputs, "output_is_list": [False] * len(outputs),
                     "output_name": outputs, "name": kind, "display_name": kind,
                     "description": "", "python_module": "ldm", "category": "ldm",
                     "output_node": kind == "SaveImage"}  # fmt: skip
    return out
