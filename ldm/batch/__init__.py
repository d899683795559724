"""Batch generation: prompt files -> jobs -> batches -> PNGs + manifest, resumable and sharded."""

from ldm.batch.jobs import Invalid, Job, JobSpec, iter_jobs, parse_seeds, parse_sweep, validate
from ldm.batch.names import image_name, slugify
from ldm.batch.run import Summary, run_batches

__all__ = [
    "Invalid", "Job", "JobSpec", "Summary", "image_name", "iter_jobs", "parse_seeds",
    "parse_sweep", "run_batches", "slugify", "validate",
]  # fmt: skip
