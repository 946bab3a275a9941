"""The FastAPI app: `uvicorn service.main:app` (settings from BYORL_* environment variables).

The lifespan handler loads the model and the indexes once, starts the dynamic batcher and the
job queue; nothing heavy happens at import. The api process never imports PyTorch.
"""

import asyncio
import logging
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI

from index import model_card
from service.auth import ApiKeyMiddleware, declare_api_key, open_paths
from service.batcher import Batcher
from service.deps import AppState
from service.errors import error_responses, install_error_handlers
from service.gallery import Gallery
from service.jobs import make_queue, sweep_forever
from service.metrics import JOB_QUEUE, MetricsMiddleware
from service.middleware import BodyLimitMiddleware
from service.routes import audits, embed, gallery, heads, health, jobs, models, search
from service.settings import Settings
from service.store import HeadStore, JobStore, ReportStore


def load_state(settings: Settings) -> AppState:
    s, data = settings, settings.data_dir
    card = model_card.read_card(s.model_dir)
    session = model_card.load_onnx_session(s.model_dir, s.num_threads, s.device)
    logging.getLogger("uvicorn.error").info(
        "encoder %s on %s (BYORL_DEVICE=%s)", card["model_id"], model_card.session_device(session),
        s.device)
    warmup = model_card.embed(session, np.zeros((1, *card["input_size"]), np.uint8))
    if warmup.shape != (1, card["embedding_dim"]):
        raise RuntimeError(f"{s.model_dir}: the encoder returns {warmup.shape[1:]}, the card "
                           f"says {card['embedding_dim']}")
    batcher = Batcher(lambda x: model_card.embed(session, x, s.max_batch), s.max_batch,
                      s.batch_wait_ms, s.max_queued_images)
    jobs = JobStore.from_settings(settings)
    return AppState(settings, card, session, batcher, Gallery(data), jobs, HeadStore(data),
                    ReportStore(data), make_queue(settings))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = load_state(settings)
        state.batcher.start()
        JOB_QUEUE.set_function(state.queue.depth)
        app.state.byorl = state
        sweeper = asyncio.create_task(sweep_forever(state.jobs, state.queue,
                                                    settings.job_sweep_s))
        yield
        sweeper.cancel()
        await state.batcher.stop()
        state.queue.close()
        state.gallery.close()

    app = FastAPI(
        title="BYORL embeddings",
        description="Adversarially robust self-supervised image embeddings, served.",
        version="0.1.0",
        lifespan=lifespan,
        responses=error_responses("default"),  # FastAPI would document its own 422 shape
    )
    install_error_handlers(app)
    app.include_router(health.router)
    for module in (embed, gallery, search, heads, audits, jobs, models):
        app.include_router(module.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key is not None:  # checked before the body limit and before any parsing
        keyless = open_paths(app, [health.router])
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key.get_secret_value(),
                           open_paths=keyless)
        declare_api_key(app, keyless)
    app.add_middleware(MetricsMiddleware)  # outermost: refused requests are counted too
    return app


app = create_app()
