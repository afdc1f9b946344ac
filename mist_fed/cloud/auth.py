"""Bearer-token auth for the Flight server, each token scoped to its tasks.

The tokens file is TOML: ``[tokens.<name>]`` with ``token = "..."`` and ``tasks = [...]`` (exact task specs;
``["*"]`` for every task). Clients send the gRPC header ``authorization: Bearer <token>``.
A missing or wrong token is refused with ``FlightUnauthenticatedError``; a task outside the
token's scope with ``FlightUnauthorizedError``. Tokens are compared in constant time and never
logged; logs name the entry (``<name>``) only.
"""

from __future__ import annotations

import hmac
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.flight as flight

from mist_fed.errors import ConfigError

MIDDLEWARE_KEY = "mist_fed.auth"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token entry's name and the tasks it may read."""

    name: str
    tasks: tuple[str, ...]

    def allows(self, task: str) -> bool:
        # Exact specs only: "synthetic" must not grant "synthetic:seed=7" (other data), nor
        # "imagefolder:/a" grant "imagefolder:/b".
        return "*" in self.tasks or task in self.tasks

    def check(self, task: str) -> None:
        if not self.allows(task):
            raise flight.FlightUnauthorizedError(
                f"token {self.name!r} is not allowed to read task {task!r}; "
                f"ask the cloud operator to add it to the token's tasks"
            )


OPEN = Principal("open", ("*",))


@dataclass(frozen=True)
class _Entry:
    name: str
    token: str
    tasks: tuple[str, ...]


class TokenTable:
    def __init__(self, entries: list[_Entry]) -> None:
        if not entries:
            raise ConfigError("the tokens file has no [tokens.<name>] entries")
        self.entries = entries

    @classmethod
    def from_toml(cls, path: str | Path) -> TokenTable:
        p = Path(path).expanduser()
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"tokens file {p} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"tokens file {p} is not valid TOML: {e}") from e
        entries = []
        for name, body in (data.get("tokens") or {}).items():
            token, tasks = body.get("token"), body.get("tasks")
            if not isinstance(token, str) or len(token) < 8:
                raise ConfigError(f"[tokens.{name}] needs a token string of at least 8 characters")
            if (
                not isinstance(tasks, list)
                or not tasks
                or not all(isinstance(t, str) for t in tasks)
            ):
                raise ConfigError(f'[tokens.{name}] needs tasks = ["task", ...] (or ["*"])')
            entries.append(_Entry(name, token, tuple(tasks)))
        return cls(entries)

    def authenticate(self, header: str | None) -> Principal:
        if not header or not header.startswith("Bearer "):
            raise flight.FlightUnauthenticatedError(
                "no bearer token: send the header 'authorization: Bearer <token>' "
                "(FeatureClient(token=...))"
            )
        given = header.removeprefix("Bearer ").strip().encode()
        found = None
        for e in self.entries:  # check every entry: time does not depend on which one matches
            if hmac.compare_digest(given, e.token.encode()):
                found = e
        if found is None:
            raise flight.FlightUnauthenticatedError(
                "invalid bearer token; check the token you were given"
            )
        return Principal(found.name, found.tasks)


class _AuthMiddleware(flight.ServerMiddleware):
    def __init__(self, principal: Principal) -> None:
        self.principal = principal


class BearerAuthFactory(flight.ServerMiddlewareFactory):
    """Authenticates every call before any handler runs."""

    def __init__(self, table: TokenTable) -> None:
        self.table = table

    def start_call(self, info: Any, headers: dict[str, list[str]]) -> _AuthMiddleware:
        values = headers.get("authorization") or headers.get("Authorization") or []
        return _AuthMiddleware(self.table.authenticate(values[0] if values else None))


def principal_of(context: Any) -> Principal:
    mw = context.get_middleware(MIDDLEWARE_KEY)
    return OPEN if mw is None else mw.principal
