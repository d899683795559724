"""The ASGI app: one Server (config, models, outputs, worker) behind the three protocols and the
page, with the security guard in front of everything (``ldm.serve.security``).

FastAPI + uvicorn: request models that ignore unknown keys (pydantic), websockets, a threadpool
for the blocking parts, and the stack A1111 itself serves its API with.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from ldm.serve import a1111, comfy, openai_images
from ldm.serve.config import ServeConfig
from ldm.serve.models import ModelTable
from ldm.serve.outputs import OutputIndex
from ldm.serve.security import Guard
from ldm.serve.worker import Worker

STATIC = Path(__file__).parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".json": "application/json", ".png": "image/png", ".svg": "image/svg+xml",
    ".ico": "image/x-icon", ".webp": "image/webp", ".txt": "text/plain; charset=utf-8",
}  # fmt: skip
# the page is the package's own files: no CDN can load (it must work offline), no framing
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self' 'unsafe-inline' data: blob:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}
PLACEHOLDER = """<!doctype html><html><head><meta charset="utf-8"><title>ldm serve</title></head>
<body><h1>ldm serve</h1><p>The web page is not installed; the APIs are up:
<code>/sdapi/v1</code>, <code>/prompt</code>, <code>/v1/images/generations</code>.</p></body></html>
"""


class Server:
    """Everything one ``ldm serve`` process holds."""

    def __init__(self, config: ServeConfig, models: ModelTable):
        self.config, self.models = config, models
        self.outputs = OutputIndex(config.outdir)
        self.worker = Worker(models, self.outputs, config.queue_size)
        self.comfy = comfy.Comfy(self)

    def progress(self, skip_current_image: bool = False) -> dict:
        """A1111's /progress: the running job's fraction, ETA, state and live preview."""
        p = self.worker.snapshot()
        job = p.job
        count = len(job.batches) if job else 0
        fraction = eta = 0.0
        if job is not None:
            fraction = (p.batch + (p.step / p.num_steps if p.num_steps else 0.0)) / count
            elapsed = time.monotonic() - p.started
            eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        state = {
            "skipped": bool(job and job.skipped), "interrupted": bool(job and job.interrupted),
            "stopping_generation": False, "job": f"Batch {p.batch + 1} out of {count}" if job
            else "", "job_count": count, "job_timestamp": "0", "job_no": p.batch,
            "sampling_step": p.step, "sampling_steps": p.num_steps,
            "queue_pending": len(self.worker.pending()),  # ldm's addition
        }  # fmt: skip
        image = None if skip_current_image else a1111.preview_b64(p.preview)
        return {"progress": round(fraction, 4), "eta_relative": round(eta, 3), "state": state,
                "current_image": image, "textinfo": None}  # fmt: skip


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        import asyncio

        server.comfy.hub.loop = asyncio.get_running_loop()
        if not server.worker._thread.is_alive():
            server.worker.start()
        yield
        server.worker.stop()

    app = FastAPI(title="ldm serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    app.include_router(a1111.router(server))
    app.include_router(openai_images.router(server))
    comfy_routes = comfy.router(server, server.comfy)
    app.include_router(comfy_routes)
    app.include_router(comfy_routes, prefix="/api")

    @app.get("/", include_in_schema=False)
    async def page():
        index = STATIC / "index.html"
        if not index.is_file():
            return HTMLResponse(PLACEHOLDER, headers=PAGE_HEADERS)
        return FileResponse(index, media_type=CONTENT_TYPES[".html"], headers=PAGE_HEADERS)

    @app.get("/static/{name:path}", include_in_schema=False)
    async def static(name: str):
        path = _static_file(name)
        if path is None:
            return JSONResponse({"detail": "not found"}, status_code=404)
        return FileResponse(path, media_type=CONTENT_TYPES[path.suffix], headers=PAGE_HEADERS)

    # outermost last: CORS answers preflights for the listed origins; the guard sees the rest
    app.add_middleware(Guard, config=server.config)
    if server.config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=server.config.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials=True,
        )
    return app


def _static_file(name: str) -> Path | None:
    """A file of the package's static folder with a known type, else None (no traversal)."""
    root = STATIC.resolve()
    path = (root / name).resolve()
    if root not in path.parents or not path.is_file() or path.suffix not in CONTENT_TYPES:
        return None
    return path
