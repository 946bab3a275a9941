"""What route handlers receive: the loaded service."""

from dataclasses import dataclass
from typing import Annotated

import numpy as np
import onnxruntime as ort
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from service.batcher import Batcher, QueueFull
from service.errors import APIError
from service.gallery import Gallery
from service.images import decode_base64, decode_images
from service.jobs import CeleryQueue, EmbeddedQueue
from service.schemas import ErrorBody
from service.settings import Settings
from service.store import HeadStore, JobStore, ReportStore

INLINE_DECODE_BYTES = 64 * 1024

# How /docs shows the 429 of the routes that embed images (`AppState.embed`).
QUEUE_FULL = {429: {"model": ErrorBody,
                    "description": "The embedding queue is full (MAX_QUEUED_IMAGES): retry "
                    "after Retry-After seconds",
                    "headers": {"Retry-After": {"description": "Seconds to wait",
                                                "schema": {"type": "integer"}}}}}


@dataclass
class AppState:
    """Everything loaded once by the lifespan handler and shared by all requests."""

    settings: Settings
    card: dict
    session: ort.InferenceSession
    batcher: Batcher
    gallery: Gallery
    jobs: JobStore
    heads: HeadStore
    reports: ReportStore
    queue: CeleryQueue | EmbeddedQueue

    @property
    def model_id(self) -> str:
        return self.card["model_id"]

    @property
    def input_size(self) -> int:
        return self.card["input_size"][-1]

    async def decode(self, blobs: list[bytes], limit: int) -> np.ndarray:
        """Image bytes -> uint8 (N, 3, S, S) at the model's input size; large payloads are
        decoded off the event loop, small ones (a thread hop costs more) on it."""
        args = (blobs, self.input_size, self.settings, limit)
        if sum(len(b) for b in blobs) <= INLINE_DECODE_BYTES:
            return decode_images(*args)
        return await run_in_threadpool(decode_images, *args)

    async def decode_base64(self, images: list[str], limit: int) -> np.ndarray:
        return await self.decode([decode_base64(s, i) for i, s in enumerate(images)], limit)

    async def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Embeddings of uint8 pixels through the dynamic batcher; 429 when its queue is full."""
        try:
            return await self.batcher(pixels)
        except QueueFull as exc:
            raise APIError(429, "queue_full", f"{exc}: retry later",
                           {"Retry-After": str(exc.retry_after_s)}) from None


def get_state(request: Request) -> AppState:
    return request.app.state.byorl


Service = Annotated[AppState, Depends(get_state)]
