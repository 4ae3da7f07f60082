"""``raddraft user add/list/passwd`` through the real CLI entry point."""

from __future__ import annotations

import io
import json

import pytest
from worklist_helpers import database_url_fixture  # noqa: F401 - fixture

from raddraft.cli import main
from worklist.auth import verify_password
from worklist.storage import Store


@pytest.fixture
def env(monkeypatch, tmp_path, database_url):
    for key in ("RADDRAFT_DATABASE_URL", "RADDRAFT_HOME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RADDRAFT_HOME", str(tmp_path))
    monkeypatch.setenv("RADDRAFT_DATABASE_URL", database_url)
    return database_url


def _stdin(monkeypatch, text):
    monkeypatch.setattr("sys.stdin", io.StringIO(text))


def test_user_add_list_and_passwd(env, monkeypatch, capsys):
    _stdin(monkeypatch, "radium-226\n")
    assert main(["user", "add", "curie", "--role", "radiologist", "--full-name", "Curie^Marie",
                 "--organization", "Institut du Radium", "--password-stdin"]) == 0
    assert "added curie (radiologist)" in capsys.readouterr().out
    _stdin(monkeypatch, "another-pass\n")
    assert main(["user", "add", "curie", "--role", "admin", "--password-stdin"]) == 1
    assert "user 'curie' already exists" in capsys.readouterr().err
    _stdin(monkeypatch, "short\n")
    assert main(["user", "add", "bob", "--role", "admin", "--password-stdin"]) == 2
    assert "password must be 8-1024 characters long, got 5" in capsys.readouterr().err
    _stdin(monkeypatch, "whatever-1\n")
    assert main(["user", "add", "bad name", "--role", "admin", "--password-stdin"]) == 2
    assert "user name 'bad name' must be 1-64 letters" in capsys.readouterr().err
    assert main(["user", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == [{"name": "curie", "role": "radiologist", "full_name": "Curie^Marie",
                       "organization": "Institut du Radium", "disabled": False, "locked": False}]
    _stdin(monkeypatch, "new-password\n")
    assert main(["user", "passwd", "curie", "--password-stdin"]) == 0
    store = Store(env if not env.startswith("postgresql://") else env.replace("postgresql://", "postgresql+psycopg://"))
    try:
        stored = store.get_user("curie")
        assert stored is not None and verify_password("new-password", stored.password_hash)
        assert not verify_password("radium-226", stored.password_hash)
        assert stored.password_hash.startswith("scrypt$16384$8$1$")
    finally:
        store.close()
