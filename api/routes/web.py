"""The web page (``GET /``): one static HTML file that reads the REST API with the user's token,
so it needs no build step and no server-side rendering."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

PAGE = Path(__file__).resolve().parents[1] / "static" / "index.html"

router = APIRouter(tags=["web"])


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    """The page itself holds no data: it asks for the token, then calls /v1 like any client."""
    return FileResponse(PAGE, media_type="text/html")
