"""One JSON shape for every error the API returns, and the handlers that produce it:

    {"error": {"code": "not_found", "message": "no job 'abc'", "fields": []}}

``fields`` lists each invalid field of a 422 by its path (``training.epsilon``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from service.artifacts import ArtifactMissing, UploadRefused
from service.jobs import (
    CheckpointUnavailable,
    IllegalTransition,
    InvalidReport,
    JobEnded,
    JobNotFound,
    LogsUnavailable,
    TrialNotFound,
)
from service.quotas import QuotaExceeded
from service.uploads import ModelNotFound
from service.users import AccountConflict, Forbidden, TokenNotFound, UserNotFound
from workers.model_format import NotAModelFile

# Stable names for clients to branch on (HTTP's own phrases change between versions).
ERROR_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    422: "invalid",
    429: "quota_exceeded",
    500: "internal_error",
    503: "unavailable",
}
DOMAIN_ERROR_STATUS: dict[type[Exception], int] = {
    JobNotFound: 404,
    TrialNotFound: 404,
    CheckpointUnavailable: 404,
    LogsUnavailable: 404,
    IllegalTransition: 409,
    UserNotFound: 404,
    TokenNotFound: 404,
    AccountConflict: 409,
    Forbidden: 403,
    QuotaExceeded: 429,
    JobEnded: 403,
    ModelNotFound: 404,
    ArtifactMissing: 404,
}


class FieldError(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    code: str
    message: str
    fields: list[FieldError] = []


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The errors a router answers with, for its OpenAPI docs."""
    return {status: {"model": ErrorResponse} for status in statuses}


def error_response(
    status: int,
    message: str,
    fields: Sequence[FieldError] = (),
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    code = ERROR_CODES.get(status, f"http_{status}")
    body = ErrorResponse(error=ErrorBody(code=code, message=message, fields=list(fields)))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    # The domain checks the spec against the server's limits with the spec's own errors.
    app.add_exception_handler(ValidationError, _validation_error)
    for exception in DOMAIN_ERROR_STATUS:
        app.add_exception_handler(exception, _domain_error)
    app.add_exception_handler(InvalidReport, _invalid_report)
    app.add_exception_handler(UploadRefused, _upload_refused)
    app.add_exception_handler(NotAModelFile, _upload_refused)
    app.add_exception_handler(Exception, _unexpected_error)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names the methods of the first route that matched the path; there may be
        # more than one (GET and POST /v1/jobs), and Allow must list them all.
        headers["Allow"] = ", ".join(allowed_methods(request))
    return error_response(exc.status_code, str(exc.detail), headers=headers or None)


def allowed_methods(request: Request) -> list[str]:
    """Every method the app documents at this request's path (its OpenAPI paths: what the
    schema promises is what Allow lists)."""
    path = request.scope["path"]
    methods: set[str] = set()
    for template, operations in request.app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


async def _request_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _invalid([_field_error(error, in_request=True) for error in exc.errors()])


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ValidationError)
    return _invalid([_field_error(error, in_request=False) for error in exc.errors()])


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    status = next(s for kind, s in DOMAIN_ERROR_STATUS.items() if isinstance(exc, kind))
    return error_response(status, str(exc))


async def _invalid_report(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidReport)
    return _invalid([FieldError(field=exc.field, message=str(exc))])


async def _upload_refused(request: Request, exc: Exception) -> JSONResponse:
    """An uploaded file refused: 413 above the size limit, else 422 naming the body."""
    if isinstance(exc, UploadRefused) and exc.too_large:
        return error_response(413, str(exc))
    return _invalid([FieldError(field="body", message=str(exc))])


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette raises the exception on after this response, so the server logs it.
    return error_response(500, "internal error; the server log has the details")


def _invalid(fields: list[FieldError]) -> JSONResponse:
    message = "; ".join(f"{f.field}: {f.message}" for f in fields)
    return error_response(422, message, fields)


def _field_error(error: Any, *, in_request: bool) -> FieldError:
    """One pydantic error as the dotted path of its field and a message: a request body's
    errors are named from the body down (``training.epsilon``), a query's as
    ``query.limit``."""
    loc = list(error["loc"])
    if in_request and loc and loc[0] == "body":
        loc = loc[1:]
    if error["type"] == "json_invalid" or not loc:
        loc = ["body"]
    message = str(error["msg"]).removeprefix("Value error, ")
    return FieldError(field=".".join(map(str, loc)), message=message)
