"""What route handlers receive: the state the lifespan handler loaded."""

from typing import Annotated

from fastapi import Depends, Request

from byorl.service.api.state import AppState


async def get_state(request: Request) -> AppState:
    """async: FastAPI runs a plain function in its thread pool, a thread hop per request."""
    return request.app.state.byorl


Service = Annotated[AppState, Depends(get_state)]
