"""The demo page (GET /demo, and / redirects there): one static HTML file with its script and
style inline (no build step), open without an API key (it asks for one and sends it itself)."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

STATIC = Path(__file__).resolve().parents[1] / "static"
router = APIRouter(tags=["demo"])


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/demo")


@router.get("/demo", response_class=FileResponse, responses={200: {"content": {"text/html": {}}}})
def demo_page() -> FileResponse:
    """Fig. 1, live: a query's neighbours for each model side by side, clean and attacked."""
    return FileResponse(STATIC / "demo.html", media_type="text/html")
