"""`diffcap serve`: one trained run behind a web page (Gradio) and an HTTP API (FastAPI), one process."""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

from .limits import Limits
from .service import CaptionService

log = logging.getLogger(__name__)


def create_app(
    run_dir: str | Path,
    *,
    device: str = "cpu",
    limits: Limits | None = None,
    max_batch: int = 16,
    max_wait_ms: float = 5.0,
    page: bool = True,
):
    """The FastAPI app: /api/caption and /api/health, and the page at / (page=False leaves it out)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local server
    from fastapi import FastAPI

    from .api import BodyLimit, add_api

    service = CaptionService(run_dir, device=device, limits=limits, max_batch=max_batch, max_wait_s=max_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(
        title="diffcap", lifespan=lifespan, docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None
    )
    app.state.service = service
    add_api(app, service)
    if page:
        import gradio as gr

        from .page import build_page

        app = gr.mount_gradio_app(
            app, build_page(service), path="/", max_file_size=service.limits.max_bytes, footer_links=[]
        )
    # Outermost, so an oversized body is refused before any route reads it.
    app.add_middleware(BodyLimit, max_upload=service.limits.max_bytes)
    return app


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 7860, **options) -> None:
    import uvicorn

    app = create_app(run_dir, **options)
    service = app.state.service
    print(
        f"diffcap serve: {service.pipe.cfg.model.kind} run {run_dir}, takes {' or '.join(service.inputs.accepts)}; "
        f"page http://{host}:{port}/ , API http://{host}:{port}/api/caption",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
