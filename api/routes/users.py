"""Accounts: admins create and disable users and issue and revoke their tokens; anyone may ask
who their token belongs to (``GET /v1/me``). A token is shown once, when it is issued."""

from __future__ import annotations

from fastapi import APIRouter, status

from api.deps import AdminDep, CurrentTokenDep, SessionDep, SettingsDep
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
def read_me(token: CurrentTokenDep, settings: SettingsDep) -> Me:
    """The user the request's token belongs to, their limits and tokens, and which token it is."""
    user = UserPublic.from_user(token.user, settings)
    return Me(**user.model_dump(), token_id=token.id)


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
) -> UserPublic:
    """Admins: set a user's own limits; a field given as null goes back to the server's."""
    overrides = body.model_dump(exclude_unset=True)
    return UserPublic.from_user(
        users.set_limit_overrides(session, name, overrides, by=admin), settings
    )


@router.delete("/users/{name}")
def disable_user(
    name: str, session: SessionDep, settings: SettingsDep, admin: AdminDep
) -> UserPublic:
    """Admins: disable a user. Their tokens stop working at once; their jobs and results stay."""
    return UserPublic.from_user(users.disable_user(session, name, by=admin), settings)


@router.post("/users/{name}/tokens", status_code=status.HTTP_201_CREATED)
def issue_token(name: str, session: SessionDep, admin: AdminDep) -> NewToken:
    """Admins: another token for a user (shown this once)."""
    return _new_token(users.issue_token(session, name, by=admin))


@router.delete("/users/{name}/tokens/{token_id}")
def revoke_token(name: str, token_id: str, session: SessionDep, admin: AdminDep) -> TokenPublic:
    """Admins: revoke one of a user's tokens; it stops working at once."""
    return TokenPublic.model_validate(users.revoke_token(session, name, token_id, by=admin))


def _new_token(issued: IssuedToken) -> NewToken:
    return NewToken(id=issued.row.id, token=issued.token, created_at=issued.row.created_at)
