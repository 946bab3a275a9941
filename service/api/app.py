"""The FastAPI app (`create_app`): the routes, the middleware, the error handlers and the
lifespan.

The lifespan handler loads the models and the galleries once, starts each model's dynamic
batcher, the job queue, the lease sweep and the model refresh (user models registered or
deleted through other replicas, every MODEL_REFRESH_S); nothing heavy happens at import. The
api process never imports PyTorch.
"""

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from byorl.service.api.auth import ApiKeyMiddleware, declare_api_key, open_paths
from byorl.service.api.errors import error_responses, install_error_handlers
from byorl.service.api.middleware import BodyLimitMiddleware, MetricsMiddleware
from byorl.service.api.routes import (
    audits,
    demo,
    embed,
    galleries,
    heads,
    health,
    jobs,
    models,
    openai_compat,
    search,
)
from byorl.service.api.state import load_state
from byorl.service.jobs.queue import sweep_forever
from byorl.service.metrics import JOB_QUEUE
from byorl.service.serving.served_models import refresh_forever
from byorl.service.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = load_state(settings)
        state.models.start()
        JOB_QUEUE.set_function(state.queue.depth)
        app.state.byorl = state
        sweeper = asyncio.create_task(sweep_forever(state.jobs, state.queue,
                                                    settings.job_sweep_s))
        refresher = asyncio.create_task(refresh_forever(state.models, settings.model_refresh_s))
        yield
        sweeper.cancel()
        refresher.cancel()
        await asyncio.gather(refresher, return_exceptions=True)
        await state.models.stop()
        state.queue.close()
        state.galleries.close()

    app = FastAPI(
        title="BYORL embeddings",
        description="Adversarially robust self-supervised image embeddings, served.",
        version="0.1.0",
        lifespan=lifespan,
        responses=error_responses("default"),  # FastAPI would document its own 422 shape
    )
    install_error_handlers(app)
    app.include_router(health.router)
    for module in (embed, openai_compat, galleries, search, heads, audits, jobs, models,
                   demo):
        app.include_router(module.router)
    upload = settings.max_model_bytes + 2**20  # the ONNX file, its card and multipart framing
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       path_limits={"/models": max(upload, settings.max_body_bytes)})
    if settings.api_key is not None:  # checked before the body limit and before any parsing
        keyless = open_paths(app, [health.router, demo.router])
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key.get_secret_value(),
                           open_paths=keyless)
        declare_api_key(app, keyless)
    app.add_middleware(MetricsMiddleware)  # outermost: refused requests are counted too
    return app
