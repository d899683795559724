"""ComfyUI's protocol (its ``server.py``): /prompt, /history, /view, /queue, /interrupt,
/object_info and the /ws websocket, also under /api/.

A queued workflow reports on the websocket of the ``client_id`` that posted it: ``status``,
``execution_start``, ``executing`` (the KSampler, the SaveImage, finally ``node: null``),
``progress`` (value/max per step) and ``executed`` with the saved images; ``/history`` is
written before the final ``executing``, so a client that waits for it finds its outputs.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import OrderedDict

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse

from ldm.serve import comfy_workflow
from ldm.serve.worker import Job, QueueFull

MAX_HISTORY = 1000  # prompts kept in /history (oldest dropped first)


class Hub:
    """Websocket clients by id; the worker thread sends through the event loop."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.clients: dict[str, set[asyncio.Queue]] = {}

    def connect(self, sid: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=1000)
        self.clients.setdefault(sid, set()).add(q)
        return q

    def disconnect(self, sid: str, q: asyncio.Queue) -> None:
        self.clients.get(sid, set()).discard(q)
        if not self.clients.get(sid):
            self.clients.pop(sid, None)

    def send(self, kind: str, data: dict, sid: str | None = None) -> None:
        """From any thread; ``sid`` None: every client."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._put, {"type": kind, "data": data}, sid)

    def _put(self, message: dict, sid: str | None) -> None:
        targets = self.clients.get(sid, set()) if sid else set().union(*self.clients.values())
        for q in targets:
            if not q.full():  # a client that stopped reading loses messages, not the server
                q.put_nowait(message)


class Comfy:
    """The ComfyUI side of a server: its hub, history, and the job events it turns into
    messages."""

    def __init__(self, server):
        self.server, self.hub = server, Hub()
        self.history: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()

    def status(self) -> dict:
        w = self.server.worker
        remaining = len(w.pending()) + (w.running() is not None)
        return {"status": {"exec_info": {"queue_remaining": remaining}}}

    def submit(self, body: dict) -> dict:
        job = comfy_workflow.parse(body.get("prompt"), self.server)
        job.extra.update(workflow=body["prompt"], client_id=body.get("client_id"),
                         extra_data=body.get("extra_data") or {})  # fmt: skip
        job.on_event = lambda kind, data: self._event(job, kind, data)
        self.server.worker.submit(job)
        self.hub.send("status", self.status())
        return {"prompt_id": job.id, "number": job.number, "node_errors": {}}

    def _event(self, job: Job, kind: str, data: dict) -> None:
        """Worker events -> ComfyUI messages to the job's client."""
        sid, save, node = job.extra["client_id"], job.extra["save"], job.extra["sampler"]
        ids = {"prompt_id": job.id}
        if kind == "start":
            self.hub.send("execution_start", {**ids, "timestamp": _ms()}, sid)
            self.hub.send("execution_cached", {**ids, "nodes": [], "timestamp": _ms()}, sid)
            self.hub.send("executing", {**ids, "node": node, "display_node": node}, sid)
        elif kind == "progress":
            self.hub.send("progress", {**ids, "value": data["value"], "max": data["max"],
                                       "node": node}, sid)  # fmt: skip
        elif kind == "batch":
            self.hub.send("executing", {**ids, "node": save, "display_node": save}, sid)
            output = {"images": [_image(i) for i in data["images"]]}
            self.hub.send("executed", {**ids, "node": save, "display_node": save,
                                       "output": output}, sid)  # fmt: skip
        elif kind == "done":
            self._finish(job, sid, ids)

    def _finish(self, job: Job, sid, ids: dict) -> None:
        error = job.future.exception()
        result = None if error else job.future.result()
        messages = [["execution_start", {**ids, "timestamp": _ms()}]]
        if error is not None:
            message = {**ids, "node_id": job.extra["sampler"], "node_type": "KSampler",
                       "exception_message": str(error), "exception_type": type(error).__name__,
                       "traceback": [], "executed": [], "timestamp": _ms()}  # fmt: skip
            self.hub.send("execution_error", message, sid)
            messages.append(["execution_error", message])
        elif result.interrupted:
            message = {
                **ids,
                "node_id": job.extra["sampler"],
                "node_type": "KSampler",
                "executed": [],
            }
            self.hub.send("execution_interrupted", message, sid)
            messages.append(["execution_interrupted", message])
        else:
            messages.append(["execution_success", {**ids, "timestamp": _ms()}])
            self.hub.send("execution_success", {**ids, "timestamp": _ms()}, sid)
        images = [_image(i) for i in result.images] if result else []
        save = job.extra["save"]
        entry = {
            "prompt": [job.number, job.id, job.extra["workflow"], job.extra["extra_data"], [save]],
            "outputs": {save: {"images": images}} if images else {},
            "status": {"status_str": "error" if error else "success",
                       "completed": error is None and not result.interrupted,
                       "messages": messages},
            "meta": {save: {"node_id": save, "display_node": save, "parent_node": None,
                            "real_node_id": save}} if images else {},
        }  # fmt: skip
        with self._lock:
            self.history[job.id] = entry
            while len(self.history) > MAX_HISTORY:
                self.history.popitem(last=False)
        self.hub.send("executing", {**ids, "node": None, "display_node": None}, sid)
        self.hub.send("status", self.status())

    def history_items(self, max_items: int | None = None) -> dict:
        with self._lock:  # the worker thread adds entries while a request reads
            items = list(self.history.items())
        return dict(items[-max_items:] if max_items else items)

    def queue(self) -> dict:
        w = self.server.worker
        running = [_entry(j) for j in [w.running()] if j is not None]
        return {"queue_running": running, "queue_pending": [_entry(j) for j in w.pending()]}


def _entry(job: Job) -> list:
    """A /queue row: [number, id, workflow, extra, outputs]; other protocols' jobs show a summary
    in place of the workflow."""
    workflow = job.extra.get("workflow") or {
        "source": job.source,
        "prompt": job.batches[0][0][0],
        "images": job.num_images,
    }
    extra = {"client_id": job.extra.get("client_id"), "source": job.source}
    return [job.number, job.id, workflow, extra, [job.extra.get("save")] if job.extra else []]


def _image(image) -> dict:
    return {"filename": image.name, "subfolder": "", "type": "output"}


def _ms() -> int:
    return int(time.time() * 1000)


def router(server, comfy: Comfy) -> APIRouter:
    """ComfyUI's routes: the prompt queue and its results, node info, and the websocket."""
    r = APIRouter()
    _queue_routes(r, server, comfy)
    _result_routes(r, server, comfy)
    _websocket_route(r, comfy)
    return r


def _queue_routes(r: APIRouter, server, comfy: Comfy) -> None:
    @r.post("/prompt")
    async def prompt(request: Request):
        try:  # JSON whatever the Content-Type says (ComfyUI's example client sends none)
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return _error(400, "invalid_prompt", "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "invalid_prompt", "the body must be a JSON object")
        try:
            return await asyncio.to_thread(comfy.submit, body)
        except comfy_workflow.WorkflowError as e:
            return JSONResponse(e.body(), status_code=400)
        except QueueFull as e:
            return _error(503, "queue_full", str(e))

    @r.get("/prompt")
    async def prompt_status():
        return comfy.status()

    @r.get("/queue")
    async def queue():
        return comfy.queue()

    @r.post("/interrupt")
    async def interrupt(request: Request):
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            body = {}
        server.worker.interrupt(body.get("prompt_id") if isinstance(body, dict) else None)
        return JSONResponse({})


def _result_routes(r: APIRouter, server, comfy: Comfy) -> None:
    @r.get("/history")
    async def history_all(max_items: int | None = None):
        return comfy.history_items(max_items)

    @r.get("/history/{prompt_id}")
    async def history(prompt_id: str):
        entry = comfy.history.get(prompt_id)
        return {prompt_id: entry} if entry is not None else {}

    @r.get("/view")
    async def view(filename: str, subfolder: str = "", type: str = "output"):
        path = server.outputs.path(filename) if not subfolder and type == "output" else None
        if path is None or not path.is_file():
            return JSONResponse({"error": "no such image made by this server"}, status_code=404)
        return FileResponse(path, media_type="image/png", filename=filename,
                            content_disposition_type="inline")  # fmt: skip

    @r.get("/object_info")
    async def object_info():
        return comfy_workflow.object_info(server)

    @r.get("/object_info/{node_class}")
    async def object_info_one(node_class: str):
        info = comfy_workflow.object_info(server)
        return {node_class: info[node_class]} if node_class in info else {}


def _websocket_route(r: APIRouter, comfy: Comfy) -> None:
    @r.websocket("/ws")
    async def ws(websocket: WebSocket, clientId: str | None = None):  # noqa: N803 (ComfyUI's)
        await websocket.accept()
        sid = clientId or uuid.uuid4().hex
        q = comfy.hub.connect(sid)
        receiver = asyncio.create_task(_drain(websocket))
        try:
            await websocket.send_json({"type": "status", "data": {**comfy.status(), "sid": sid}})
            while True:
                getter = asyncio.create_task(q.get())
                done, _ = await asyncio.wait({getter, receiver},
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if getter not in done:
                    getter.cancel()
                    break
                await websocket.send_json(getter.result())
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            receiver.cancel()
            comfy.hub.disconnect(sid, q)


async def _drain(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, until it goes away."""
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
    except (WebSocketDisconnect, RuntimeError):
        return


def _error(status: int, kind: str, message: str) -> JSONResponse:
    body = {"error": {"type": kind, "message": message, "details": "", "extra_info": {}},
            "node_errors": {}}  # fmt: skip
    return JSONResponse(body, status_code=status)
