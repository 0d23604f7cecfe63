"""Accounts: admins create and disable users and issue and revoke their tokens; anyone may ask
who their token belongs to (``GET /v1/me``). A token is shown once, when it is issued."""

from __future__ import annotations

from fastapi import APIRouter, status

from api.deps import (
    AdminDep,
    CurrentTokenDep,
    CurrentUserDep,
    SessionDep,
    SettingsDep,
    TokenCacheDep,
)
from api.errors import error_responses
from api.schemas import (
    LimitOverrides,
    Me,
    NewToken,
    TokenPublic,
    UserCreate,
    UserCreated,
    UserPublic,
)
from service import users
from service.users import IssuedToken

router = APIRouter(prefix="/v1", tags=["users"], responses=error_responses(401, 403, 404, 409))


@router.get("/me")
def read_me(token: CurrentTokenDep, user: CurrentUserDep, settings: SettingsDep) -> Me:
    """The user the request's token belongs to, their limits and tokens, and which token it is."""
    public = UserPublic.from_user(user, settings)
    return Me(**public.model_dump(), token_id=token.id)


@router.post("/users", status_code=status.HTTP_201_CREATED, responses=error_responses(422))
def create_user(
    body: UserCreate, session: SessionDep, settings: SettingsDep, admin: AdminDep
) -> UserCreated:
    """Admins: a new user and their first token (shown this once)."""
    issued = users.create_user(session, body.name, admin=body.admin, by=admin)
    return UserCreated(
        user=UserPublic.from_user(issued.row.user, settings), token=_new_token(issued)
    )


@router.get("/users")
def list_users(session: SessionDep, settings: SettingsDep, admin: AdminDep) -> list[UserPublic]:
    """Admins: every user, disabled ones too, with their limits and tokens (never the tokens
    themselves: those were shown once)."""
    return [UserPublic.from_user(user, settings) for user in users.list_users(session)]


@router.get("/users/{name}")
def read_user(name: str, session: SessionDep, settings: SettingsDep, admin: AdminDep) -> UserPublic:
    return UserPublic.from_user(users.get_user(session, name), settings)


@router.patch("/users/{name}", responses=error_responses(422))
def update_limits(
    name: str,
    body: LimitOverrides,
    session: SessionDep,
    settings: SettingsDep,
    admin: AdminDep,
    token_cache: TokenCacheDep,
) -> UserPublic:
    """Admins: set a user's own limits; a field given as null goes back to the server's."""
    overrides = body.model_dump(exclude_unset=True)
    user = users.set_limit_overrides(session, name, overrides, by=admin)
    token_cache.clear()  # cached users carry their limits
    return UserPublic.from_user(user, settings)


@router.delete("/users/{name}")
def disable_user(
    name: str,
    session: SessionDep,
    settings: SettingsDep,
    admin: AdminDep,
    token_cache: TokenCacheDep,
) -> UserPublic:
    """Admins: disable a user. Their tokens stop working at once on the API process that took
    the request, and within ADVORCH_TOKEN_CACHE_S on the others; their jobs and results stay."""
    user = users.disable_user(session, name, by=admin)
    token_cache.clear()
    return UserPublic.from_user(user, settings)


@router.post("/users/{name}/tokens", status_code=status.HTTP_201_CREATED)
def issue_token(name: str, session: SessionDep, admin: AdminDep) -> NewToken:
    """Admins: another token for a user (shown this once)."""
    return _new_token(users.issue_token(session, name, by=admin))


@router.delete("/users/{name}/tokens/{token_id}")
def revoke_token(
    name: str, token_id: str, session: SessionDep, admin: AdminDep, token_cache: TokenCacheDep
) -> TokenPublic:
    """Admins: revoke one of a user's tokens. It stops working at once on the API process that
    took the request, and within ADVORCH_TOKEN_CACHE_S on the others."""
    revoked = users.revoke_token(session, name, token_id, by=admin)
    token_cache.clear()
    return TokenPublic.model_validate(revoked)


def _new_token(issued: IssuedToken) -> NewToken:
    return NewToken(id=issued.row.id, token=issued.token, created_at=issued.row.created_at)
