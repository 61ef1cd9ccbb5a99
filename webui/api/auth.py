"""HTTP basic authentication for the API: `user:pass[,user2:pass2]` credentials from the
command line, checked in constant time; anything else gets 401 before the route runs."""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPBasic, HTTPBasicCredentials


@dataclass(frozen=True)
class Credential:
    user: str
    password: str

    def matches(self, user: str, password: str) -> bool:
        # both compared, always, so the time taken does not tell which one was wrong
        same_user = secrets.compare_digest(self.user.encode(), user.encode())
        same_password = secrets.compare_digest(self.password.encode(), password.encode())
        return same_user and same_password


def parse_credentials(text: str) -> tuple[Credential, ...]:
    """`user:pass,user2:pass2` -> credentials; the first `:` of each pair splits, so passwords
    may hold `:`. Raises ValueError naming the bad pair."""
    credentials = []
    for pair in text.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{pair.strip()!r} is not user:password")
        credentials.append(Credential(user, password))
    return tuple(credentials)


def basic_header_matches(header: str | None, credentials: Sequence[Credential]) -> bool:
    """Whether an `Authorization: Basic ...` header carries one of `credentials`."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return bool(sep) and any(c.matches(user, password) for c in credentials)


_basic = HTTPBasic(auto_error=False, description="--api-auth user:password")


def basic_auth(credentials: Sequence[Credential]) -> Callable[..., None]:
    """A FastAPI dependency that lets a request through only with one of `credentials`
    (everyone when there are none)."""
    allowed = tuple(credentials)

    def check(given: Annotated[HTTPBasicCredentials | None, Depends(_basic)]) -> None:
        if not allowed:
            return
        if given is None or not any(c.matches(given.username, given.password) for c in allowed):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="Incorrect username or password",
                headers={"WWW-Authenticate": "Basic"},
            )

    return check
