"""``ldm serve``: a local server that A1111, ComfyUI and OpenAI images clients drive unmodified.

``app`` builds the ASGI app (protocols in ``a1111``, ``comfy``, ``openai_images``), ``worker``
owns the model and its bounded queue, ``security`` guards every route, ``runner`` starts uvicorn.
See docs/serve.md.
"""
