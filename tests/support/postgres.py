"""A fresh PostgreSQL database per test, on the server named by ``FEDHFT_TEST_POSTGRES``.

Default ``postgresql://postgres@127.0.0.1:5432/test`` (what ``scripts/ensure-services`` brings up). The database
is created with a random name and dropped afterwards (its connections terminated first: a test may leave a
killed server's backend behind for a moment). An unreachable server fails the test with one line saying what
to install or start: PostgreSQL-backed state is part of the product, so its tests never skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
ENV = "FEDHFT_TEST_POSTGRES"


class PostgresUnreachable(AssertionError):
    """The test server cannot be reached (one line: what to install or start)."""


def admin_url() -> str:
    return os.environ.get(ENV) or DEFAULT_URL


def database_url(admin: str, name: str) -> str:
    """``admin`` with its database replaced by ``name``, as a postgresql:// URL (what --state takes)."""
    params = conninfo_to_dict(admin)
    auth = params.get("user", "")
    if params.get("password"):
        auth += f":{params['password']}"
    host = params.get("host", "127.0.0.1")
    port = params.get("port", "5432")
    return f"postgresql://{auth}{'@' if auth else ''}{host}:{port}/{name}"


def connect_admin(admin: str) -> psycopg.Connection:
    """An autocommit connection to the test server; PostgresUnreachable when it cannot be reached."""
    try:
        return psycopg.connect(make_conninfo(admin, connect_timeout=5), autocommit=True)
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or ["unreachable"])[0]
        raise PostgresUnreachable(
            f"PostgreSQL is not reachable at {admin} ({first}): install and start it (`scripts/ensure-services`, "
            f"or `apt-get install postgresql`), or name a server with {ENV}=postgresql://USER@HOST:PORT/DB"
        ) from None


@contextmanager
def fresh_database() -> Iterator[str]:
    """Create a randomly named database, yield its postgresql:// URL, drop it afterwards."""
    admin = admin_url()
    name = f"fedhft_test_{uuid.uuid4().hex[:12]}"
    with connect_admin(admin) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield database_url(admin, name)
    finally:
        with connect_admin(admin) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def terminate_backends(url: str, application_like: str) -> int:
    """End the backends of ``url``'s database whose application_name is LIKE ``application_like`` (what a database
    restart or failover does to a server's session); how many were ended."""
    name = conninfo_to_dict(url)["dbname"]
    with connect_admin(admin_url()) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name LIKE %s",
            (name, application_like),
        ).fetchall()
    return len(rows)


def allow_connections(url: str, allowed: bool) -> None:
    """Let new connections into ``url``'s database or refuse them (a database that is down, for its clients)."""
    name = conninfo_to_dict(url)["dbname"]
    with connect_admin(admin_url()) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(sql.Identifier(name), sql.Literal(allowed))
        )
