"""Users and their API tokens: who is calling, and the accounts admins manage.

A token is ``adv_<id>_<secret>``: ``secret`` is 32 random bytes, and ``id`` a short random name
that the token carries in clear, so that it can be listed and revoked without being shown
again. The database keeps only the token's SHA-256 (and its id), so a copy of the database
opens nothing. A user may hold several tokens, each revocable; a disabled user's tokens all
stop working, and their jobs and results stay.

The bootstrap admin is the user named ``admin`` (the migration makes it and gives it the jobs
that were there before users). Its token is the service's own: ``ADVORCH_API_TOKEN`` or
``$ADVORCH_HOME/api_token``, hashed into the token named ``bootstrap`` at every start. Revoking
that token lasts until a different one is configured.

Each function that writes commits before it returns, with its audit event; one that raises has
changed nothing.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, contains_eager, selectinload, sessionmaker

from service.audit import Actor, audit_event
from service.models import ApiToken, AuditAction, User, utcnow

BOOTSTRAP_ADMIN = "admin"
BOOTSTRAP_TOKEN_ID = "bootstrap"
TOKEN_PREFIX = "adv_"
TOKEN_SECRET_BYTES = 32
TOKEN_ID_BYTES = 6  # 12 hex digits: names only, the secret is what protects


class UserNotFound(Exception):
    pass


class TokenNotFound(Exception):
    pass


class AccountConflict(Exception):
    """The accounts are not in a state that allows this (a name taken, a user disabled)."""


class Forbidden(Exception):
    """The caller is known, but may not do this."""


@dataclass(frozen=True)
class IssuedToken:
    """A token just made: its row, and the token itself, which is never shown again."""

    row: ApiToken
    token: str


def hash_token(token: str) -> str:
    """The token as stored and looked up.

    SHA-256 and not a slow password hash (bcrypt, argon2): a token is 32 random bytes, so no
    guessing can search its space however fast each guess is, and a fast hash keeps the check
    of every request to one hash and one indexed lookup.
    """
    return hashlib.sha256(token.encode()).hexdigest()


def authenticate(session: Session, presented: str) -> ApiToken | None:
    """The live token ``presented`` is, with its user; None when it is no token, a revoked one,
    or one of a disabled user.

    One indexed lookup by the token's hash (the API puts :class:`TokenCache` in front of it).
    The lookup compares hashes, not tokens: what its timing could reveal is how much of a
    guess's SHA-256 matches a stored one, which brings a guess no closer to a token.
    """
    query = (
        select(ApiToken)
        .join(ApiToken.user)
        .options(contains_eager(ApiToken.user))
        .where(
            ApiToken.token_hash == hash_token(presented),
            ApiToken.revoked_at.is_(None),
            User.disabled_at.is_(None),
        )
    )
    return session.scalar(query)


class TokenCache:
    """Tokens found live, trusted for ``ttl_s`` without asking the database again: under load
    most requests then cost no authentication query. A revocation, or a disabled user, counts
    at most ``ttl_s`` later (every API process has its own cache); an unknown token is never
    cached, so it is refused however recently it was made live.

    What it hands out (the token and its user) is detached from any session and shared between
    requests: read it, never change it or add it to a session (``Session.merge(...,
    load=False)`` gives a request its own copy, without a query).
    """

    # Far more than any deployment's tokens; a bound all the same.
    MAX_ENTRIES = 10_000

    def __init__(self, session_factory: sessionmaker[Session], ttl_s: float) -> None:
        self._session_factory = session_factory
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, ApiToken]] = {}

    def cached(self, presented: str) -> ApiToken | None:
        """The token, if it was found live less than ``ttl_s`` ago; None otherwise (look it up
        with :meth:`authenticate`)."""
        entry = self._entries.get(hash_token(presented))
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def clear(self) -> None:
        """Forget every token: after a change to tokens or users made through this process."""
        self._entries.clear()

    def authenticate(self, presented: str) -> ApiToken | None:
        """Look the token up in the database (in a session of its own, closed at once, so what
        is cached belongs to no request's session) and cache it when live."""
        with self._session_factory() as session:
            token = authenticate(session, presented)
        if token is not None and self._ttl_s > 0:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            self._entries[token.token_hash] = (time.monotonic() + self._ttl_s, token)
        return token


def ensure_bootstrap_admin(session: Session, api_token: str) -> User:
    """The bootstrap admin, made when missing, with ``api_token`` (the service's configured
    token) as its ``bootstrap`` token; commits. A changed token replaces the old one, and a
    revoked one stays revoked until it is changed."""
    for _ in range(2):  # once more when another replica starting beside this one got there first
        admin = session.scalar(select(User).where(User.name == BOOTSTRAP_ADMIN))
        if admin is None:
            admin = User(name=BOOTSTRAP_ADMIN, is_admin=True)
            session.add(admin)
        token_hash = hash_token(api_token)
        row = session.get(ApiToken, BOOTSTRAP_TOKEN_ID)
        if row is None:
            session.add(ApiToken(id=BOOTSTRAP_TOKEN_ID, user=admin, token_hash=token_hash))
        elif row.token_hash != token_hash:
            row.token_hash, row.revoked_at = token_hash, None
        try:
            session.commit()
            return admin
        except IntegrityError:
            session.rollback()
    raise RuntimeError("could not set up the bootstrap admin; is another server changing it?")


def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise UserNotFound(f"no user {name!r}")
    return user


def list_users(session: Session) -> list[User]:
    """Every user, disabled ones too, by name, with their tokens."""
    query = select(User).options(selectinload(User.tokens)).order_by(User.name)
    return list(session.scalars(query))


def create_user(session: Session, name: str, *, admin: bool, by: User) -> IssuedToken:
    """A new user with a first token; commits. A name taken (even by a disabled user) is an
    AccountConflict."""
    if session.scalar(select(func.count()).where(User.name == name)):
        raise AccountConflict(f"user {name!r} exists already")
    user = User(name=name, is_admin=admin)
    session.add(user)
    detail = "admin" if admin else ""
    session.add(audit_event(Actor.of_user(by), AuditAction.USER_CREATE, name, detail))
    issued = _new_token(session, user, by=by)
    try:
        session.commit()
    except IntegrityError as err:  # the same name, created meanwhile
        session.rollback()
        raise AccountConflict(f"user {name!r} exists already") from err
    return issued


def disable_user(session: Session, name: str, *, by: User) -> User:
    """Disable a user, whose tokens stop working at once; commits. Their jobs stay (queued ones
    still run: cancel them to stop them). Disabling a disabled user changes nothing, and the
    last enabled admin cannot be disabled, so that someone can always manage the service."""
    user = get_user(session, name)
    if user.disabled_at is not None:
        return user
    if user.is_admin:
        enabled_admins = select(func.count()).where(
            User.is_admin.is_(True), User.disabled_at.is_(None)
        )
        if (session.scalar(enabled_admins) or 0) <= 1:
            raise AccountConflict(f"{name!r} is the last enabled admin; make another one first")
    user.disabled_at = utcnow()
    session.add(audit_event(Actor.of_user(by), AuditAction.USER_DISABLE, name))
    session.commit()
    return user


def set_limit_overrides(
    session: Session, name: str, overrides: dict[str, int | None], *, by: User
) -> User:
    """Set (an int) or clear (None: the server's setting applies again) a user's overrides of
    ``max_active_jobs`` and ``max_trials_per_job``; commits."""
    user = get_user(session, name)
    for limit, value in overrides.items():
        if limit not in ("max_active_jobs", "max_trials_per_job"):
            raise ValueError(f"no per-user limit {limit!r}")
        setattr(user, limit, value)
    detail = ", ".join(f"{limit}={value}" for limit, value in overrides.items())
    session.add(audit_event(Actor.of_user(by), AuditAction.USER_LIMITS, name, detail))
    session.commit()
    return user


def issue_token(session: Session, name: str, *, by: User) -> IssuedToken:
    """Another token for user ``name``; commits."""
    user = get_user(session, name)
    if user.disabled_at is not None:
        raise AccountConflict(f"user {name!r} is disabled")
    issued = _new_token(session, user, by=by)
    session.commit()
    return issued


def revoke_token(session: Session, name: str, token_id: str, *, by: User) -> ApiToken:
    """Revoke one of user ``name``'s tokens; it stops working at once. Commits; revoking a
    revoked token changes nothing."""
    user = get_user(session, name)
    row = session.get(ApiToken, token_id)
    if row is None or row.user_id != user.id:
        raise TokenNotFound(f"user {name!r} has no token {token_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        detail = f"of user {name}"
        session.add(audit_event(Actor.of_user(by), AuditAction.TOKEN_REVOKE, token_id, detail))
        session.commit()
    return row


def _new_token(session: Session, user: User, *, by: User) -> IssuedToken:
    token_id = secrets.token_hex(TOKEN_ID_BYTES)
    token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(TOKEN_SECRET_BYTES)}"
    row = ApiToken(id=token_id, user=user, token_hash=hash_token(token))
    session.add(row)
    detail = f"for user {user.name}"
    session.add(audit_event(Actor.of_user(by), AuditAction.TOKEN_ISSUE, token_id, detail))
    return IssuedToken(row=row, token=token)


def owner_filter(session: Session, viewer: User, owner: str | None) -> int | None:
    """The owner whose jobs ``viewer`` lists (None: everyone's). A user lists their own; an
    admin everyone's, or ``owner``'s."""
    if not viewer.is_admin:
        if owner is not None and owner != viewer.name:
            raise Forbidden("only admins may list other users' jobs")
        return viewer.id
    return None if owner is None else get_user(session, owner).id
