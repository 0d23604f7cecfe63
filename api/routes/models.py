"""Model files users upload for evaluate jobs: an advorch checkpoint or a ``torch.export``
program (``.pt2``), sent as the raw request body and streamed to the artifact store."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, status
from starlette.concurrency import run_in_threadpool

from api.deps import ArtifactsDep, CurrentUserDep, SessionDep, SettingsDep, current_token
from api.errors import error_responses
from api.schemas import ModelPublic
from service import uploads
from service.artifacts import receive, temporary_upload
from workers.model_format import model_format

router = APIRouter(
    prefix="/v1/models",
    tags=["models"],
    dependencies=[Depends(current_token)],
    responses=error_responses(401, 404, 413, 422),
)

FileName = Annotated[str, Query(min_length=1, max_length=255, pattern=r"^[^/\\]+$")]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {}}}},
)
async def upload_model(
    request: Request,
    filename: FileName,
    session: SessionDep,
    settings: SettingsDep,
    store: ArtifactsDep,
    user: CurrentUserDep,
    x_content_sha256: Annotated[str | None, Header()] = None,
) -> ModelPublic:
    """Upload a model file as the body (``application/octet-stream``); evaluate jobs then name
    it as ``source: {model: ID}``. With an ``X-Content-SHA256`` header the upload is checked
    against it. A file that is no model is refused with 422 before anything loads it."""
    with temporary_upload(settings.home / "uploads") as path:
        received = await receive(
            request.stream(),
            path,
            max_bytes=settings.max_upload_bytes,
            expected_sha256=x_content_sha256,
        )
        kind = model_format(path)

        def store_and_record() -> ModelPublic:
            model = uploads.record_model(session, user, filename, received, kind)
            store.put(uploads.model_key(model.id), path)
            session.commit()
            return ModelPublic.model_validate(model)

        return await run_in_threadpool(store_and_record)


@router.get("")
def list_models(session: SessionDep, user: CurrentUserDep) -> list[ModelPublic]:
    """The caller's uploaded models (every user's, for an admin), newest first."""
    return [ModelPublic.model_validate(m) for m in uploads.list_models(session, visible_to=user)]


@router.get("/{model_id}")
def read_model(model_id: str, session: SessionDep, user: CurrentUserDep) -> ModelPublic:
    return ModelPublic.model_validate(uploads.get_model(session, model_id, visible_to=user))
