"""Sign-in hardening over real HTTP on loopback: account lockout with an admin unlock, the per-address throttle,
the same time for unknown users as for wrong passwords, and a new password ending the user's sessions."""

from __future__ import annotations

import io
import json
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from worklist_helpers import Client, database_url_fixture, settings_for  # noqa: F401 - fixture

from raddraft.cli import main
from worklist import auth
from worklist.app import WorklistApp
from worklist.bridge import Bridge
from worklist.server import RunningServer
from worklist.storage import Store


@contextmanager
def served(home: Path, database_url: str, **overrides: Any) -> Iterator[tuple[Client, Store]]:
    """A worklist server over *database_url* with curie (radiologist) and root (admin)."""
    settings = settings_for(home, database_url, **overrides)
    store = Store.from_settings(settings)
    try:
        if store.get_user("curie") is None:
            store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                           organization="Institut du Radium", now=datetime.now(UTC))
            store.add_user("root", "admin", auth.hash_password("admin-pass"), full_name="Admin", organization="X",
                           now=datetime.now(UTC))
        with RunningServer(WorklistApp(Bridge(settings, store))) as server:
            yield Client(server), store
    finally:
        store.close()


@pytest.fixture
def cli_env(monkeypatch, tmp_path, database_url):
    """``raddraft user …`` through the real entry point, on the test's database."""
    monkeypatch.setenv("RADDRAFT_HOME", str(tmp_path))
    monkeypatch.setenv("RADDRAFT_DATABASE_URL", database_url)
    return database_url


def actions(store: Store) -> list[tuple[str, str]]:
    return [(e.username, e.action) for e in reversed(store.audit_entries())]


def test_an_account_locks_after_the_failures_and_stays_locked_until_an_admin_unlocks_it(
        tmp_path, database_url, cli_env, capsys):
    """Before: 200 wrong passwords were answered and the right one then worked."""
    with served(tmp_path, database_url, login_max_failures=3) as (client, store):
        for _ in range(3):
            assert client.login(password="not-the-password")[0].status == 401
        response, data, _ = client.login()  # the right password, too late
        assert response.status == 401 and b"Wrong user name or password." in data  # says nothing more
        assert "rd_session" not in client.cookies
        assert store.get_user("curie").locked
        assert actions(store).count(("curie", "login-locked")) == 1
        assert client.login("root", "admin-pass")[0].status == 303  # only that account is locked
    with served(tmp_path, database_url, login_max_failures=3) as (client, store):  # a restart: still locked
        assert client.login()[0].status == 401
    assert main(["user", "list", "--json"]) == 0
    assert {u["name"]: u["locked"] for u in json.loads(capsys.readouterr().out)} == {"curie": True, "root": False}
    assert main(["user", "unlock", "curie"]) == 0
    assert capsys.readouterr().out == "curie unlocked\n"
    assert main(["user", "unlock", "curie"]) == 0
    assert capsys.readouterr().out == "curie was not locked\n"
    assert main(["user", "unlock", "nobody"]) == 2
    assert "user 'nobody' does not exist" in capsys.readouterr().err
    with served(tmp_path, database_url, login_max_failures=3) as (client, store):
        assert client.login(password="not-the-password")[0].status == 401  # the count starts again
        assert client.login()[0].status == 303
        assert ("cli", "unlock") in actions(store)
        assert not store.get_user("curie").locked


def test_an_address_with_too_many_failures_gets_429_without_its_password_checked(tmp_path, database_url):
    with served(tmp_path, database_url, login_address_max_failures=4, login_address_window_s=120) as (client, store):
        for name in ("curie", "nobody", "someone", "curie"):  # any user name counts for the address
            assert client.login(name, "not-the-password")[0].status == 401
        failed = actions(store).count(("curie", "login-failed"))
        response, data, _ = client.login()  # even the right password is not looked at
        assert response.status == 429 and b"Too many failed sign-ins from this address" in data
        assert 1 <= int(response.headers["Retry-After"]) <= 120
        assert "rd_session" not in client.cookies
        assert actions(store).count(("curie", "login-failed")) == failed  # not counted against the user
        assert actions(store).count(("curie", "login-throttled")) == 1
        assert not store.get_user("curie").locked


def test_an_unknown_user_takes_as_long_as_a_wrong_password(tmp_path, database_url):
    """Before: 35 ms for a known user's wrong password, 1.5 ms for an unknown user (which named the users)."""
    with served(tmp_path, database_url, login_max_failures=100, login_address_max_failures=100) as (client, _):

        def seconds(username: str) -> float:
            start = time.perf_counter()
            assert client.login(username, "not-the-password")[0].status == 401
            return time.perf_counter() - start

        seconds("curie"), seconds("nobody")  # warm up (the dummy hash is made once)
        known = statistics.median(seconds("curie") for _ in range(5))
        unknown = statistics.median(seconds("nobody") for _ in range(5))
    assert unknown / known > 0.5, f"unknown user {unknown * 1000:.1f} ms, wrong password {known * 1000:.1f} ms"


def test_a_new_password_ends_the_sessions_of_that_user(tmp_path, database_url, cli_env, monkeypatch, capsys):
    with served(tmp_path, database_url) as (client, store):
        admin = Client(client.server)
        assert client.login()[0].status == 303 and admin.login("root", "admin-pass")[0].status == 303
        assert client.request("GET", "/api/studies")[0].status == 200
        monkeypatch.setattr("sys.stdin", io.StringIO("a-new-password\n"))
        assert main(["user", "passwd", "curie", "--password-stdin"]) == 0
        assert capsys.readouterr().out == "password of curie changed; 1 session(s) signed out\n"
        assert client.request("GET", "/api/studies")[0].status == 401  # the old cookie stopped working
        assert admin.request("GET", "/api/studies")[0].status == 200  # other users keep theirs
        store.set_password("root", auth.hash_password("another-pass"))
        assert admin.request("GET", "/api/studies")[0].status == 401
        assert client.login(password="a-new-password")[0].status == 303
