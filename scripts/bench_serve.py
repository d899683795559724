"""Load test of ``ldm serve``: N concurrent clients x M requests vs the same jobs via ``ldm batch``.

Each request is an A1111 txt2img of ``--batch-size`` images (its own prompt, seeds s..s+B-1); the
same jobs go through ``ldm batch --batch-size B`` as a JSONL file, so both make identical pipeline
calls. Reports throughput of each (model load excluded: the server is warmed up, ldm batch's own
summary times its generation, in this process after the server so neither pays one-time
imports), p50/p95 request latency, that every (prompt, seed) came back
exactly once, and how many server images are byte-equal to ldm batch's files.

    .venv/bin/python scripts/bench_serve.py --clients 4 --requests 4 --steps 8
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (4)")
    p.add_argument("--requests", type=int, default=4, help="requests per client (4)")
    p.add_argument("--batch-size", type=int, default=1, help="images per request and per call")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--model", default=None, help="default: the bundled demo model")
    p.add_argument("--device", default=None)
    p.add_argument("--queue-size", type=int, default=None, help="default: clients")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: "
                   "torch's); on a busy machine OpenMP teams in the main thread (ldm batch) and "
                   "in the worker thread (ldm serve) slow down differently")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3, help="serve-then-batch rounds (3): the "
                   "machine's load drifts, the ratio within a round is what counts")  # fmt: skip
    return p.parse_args(argv)


def jobs(args) -> list[dict]:
    n = args.clients * args.requests
    return [{"prompt": f"a red circle, bench {k}", "seed": 1000 + k * args.batch_size,
             "batch_size": args.batch_size} for k in range(n)]  # fmt: skip


def run_server(args, work: Path, all_jobs: list[dict]) -> dict:
    import httpx

    from ldm.serve.app import Server
    from ldm.serve.config import ServeConfig
    from ldm.serve.models import ModelTable
    from ldm.serve.runner import ThreadedServer

    models = ModelTable([args.model] if args.model else [None], device=args.device)
    models.pipeline(models.selected)
    config = ServeConfig(outdir=work / "serve", queue_size=args.queue_size or args.clients)
    size = {"width": args.size, "height": args.size} if args.size else {}
    common = {"steps": args.steps, "sampler_name": "DPM++ 2M", "cfg_scale": 7.5, **size}
    latencies, images, errors = [], [], []
    lock = threading.Lock()
    with ThreadedServer(Server(config, models)) as url:
        warm = {"prompt": "warm-up", "seed": 1, "batch_size": args.batch_size, **common}
        httpx.post(f"{url}/sdapi/v1/txt2img", json=warm, timeout=600).raise_for_status()

        def client(mine: list[dict]) -> None:
            with httpx.Client(timeout=600) as http:
                for job in mine:
                    start = time.perf_counter()
                    r = http.post(f"{url}/sdapi/v1/txt2img", json={**job, **common})
                    seconds = time.perf_counter() - start
                    with lock:
                        if r.status_code != 200:
                            errors.append(f"{r.status_code} {r.text[:200]}")
                            continue
                        latencies.append(seconds)
                        images.extend(base64.b64decode(i) for i in r.json()["images"])

        shares = [all_jobs[c :: args.clients] for c in range(args.clients)]
        threads = [threading.Thread(target=client, args=(share,)) for share in shares]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    return {"images": images, "latencies": latencies, "errors": errors, "seconds": wall}


def run_batch(args, work: Path, all_jobs: list[dict]) -> dict:
    prompts = work / "jobs.jsonl"
    prompts.write_text("".join(json.dumps(j) + "\n" for j in all_jobs))
    outdir = work / "batch"
    size = ["--height", str(args.size), "--width", str(args.size)] if args.size else []
    argv = ["batch", "--prompts", str(prompts), "--outdir", str(outdir), "--batch-size",
            str(args.batch_size), "--steps", str(args.steps), "--sampler", "DPM++ 2M",
            "--guidance-scale", "7.5", "--no-progress", *size]  # fmt: skip
    if args.model:
        argv += ["--model", args.model]
    if args.device:
        argv += ["--device", args.device]
    # in this (warm) process, after the server: one-time imports are paid by neither
    from ldm.cli import main as ldm_main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        rc = ldm_main(argv)
    if rc != 0:
        raise SystemExit(f"ldm batch failed: {stderr.getvalue()[-2000:]}")
    m = re.search(r"(\d+) made.* in ([\d.]+) s", stderr.getvalue())
    files = sorted(p for p in outdir.glob("*.png"))
    return {"made": int(m.group(1)), "seconds": float(m.group(2)),
            "files": [p.read_bytes() for p in files]}  # fmt: skip


def check(server: dict, batch: dict, all_jobs: list[dict], batch_size: int) -> dict:
    """Every (prompt, seed) back exactly once; how many equal ldm batch's bytes."""
    from io import BytesIO

    from PIL import Image

    keys = Counter()
    for data in server["images"]:
        record = json.loads(Image.open(BytesIO(data)).text["ldm"])
        keys[(record["prompt"], record["seed"])] += 1
    want = {(j["prompt"], j["seed"] + i) for j in all_jobs for i in range(batch_size)}
    batch_hashes = {hashlib.sha256(f).hexdigest() for f in batch["files"]}
    equal = sum(hashlib.sha256(d).hexdigest() in batch_hashes for d in server["images"])
    return {"expected": len(want), "received": sum(keys.values()),
            "lost": len(want - set(keys)), "duplicated": sum(c - 1 for c in keys.values() if c > 1),
            "unexpected": len(set(keys) - want), "equal_to_batch": equal}  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    all_jobs = jobs(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(f"jobs: {args.clients} clients x {args.requests} requests x {args.batch_size} images, "
          f"{args.steps} steps; {args.rounds} rounds of serve then batch; torch threads "
          f"{args.threads or 'default'}")  # fmt: skip
    ratios, ok = [], True
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            server = run_server(args, work, all_jobs)
            batch = run_batch(args, work, all_jobs)
            result = check(server, batch, all_jobs, args.batch_size)
        n_images = len(server["images"])
        lat = sorted(server["latencies"])
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))] if lat else float("nan")
        serve_rate = n_images / server["seconds"]
        batch_rate = batch["made"] / batch["seconds"]
        ratios.append(serve_rate / batch_rate)
        print(f"round {r + 1}: ldm serve {n_images} images in {server['seconds']:.2f} s = "
              f"{serve_rate:.2f} img/s (latency p50 {statistics.median(lat):.3f} s, p95 "
              f"{p95:.3f} s, errors {len(server['errors'])}); ldm batch {batch['made']} in "
              f"{batch['seconds']:.2f} s = {batch_rate:.2f} img/s; serve/batch "
              f"{ratios[-1]:.2f}x")  # fmt: skip
        print("  requests: " + ", ".join(f"{k} {v}" for k, v in result.items()))
        for error in server["errors"][:5]:
            print(f"  error: {error}")
        ok &= not server["errors"] and result["lost"] == result["duplicated"] == 0
        ok &= result["unexpected"] == 0
    print(f"serve / batch throughput: median {statistics.median(ratios):.2f}x "
          f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
