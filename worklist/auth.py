"""Passwords, session tokens and CSRF tokens of the worklist.

Passwords are hashed with scrypt (RFC 7914; n=2**14, r=8, p=1, 16-byte random salt) and stored as
``scrypt$n$r$p$salt_hex$hash_hex``; comparison is constant-time. Session and CSRF tokens are 32 random bytes
(URL-safe base64); the database keeps only the SHA-256 of a session token, so a copy of the database cannot be
used to log in. A sign-in for a user that does not exist is checked against a dummy hash of the same parameters
(``check_sign_in``), so its answer takes as long as a wrong password's and does not tell which users exist.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from enum import StrEnum

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
TOKEN_BYTES = 32


class Role(StrEnum):
    RADIOLOGIST = "radiologist"  # reviews, edits and signs reports
    ADMIN = "admin"  # reads the worklist and the audit log; cannot sign


def check_username(username: str) -> str:
    """A user name: 1-64 characters of letters, digits, ``.``, ``_``, ``-``."""
    if not 1 <= len(username) <= 64 or not all(c.isalnum() or c in "._-" for c in username):
        raise ValueError(f"user name {username!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return username


def hash_password(password: str) -> str:
    """A salted scrypt hash of *password*, with its parameters, for the users table."""
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise ValueError(f"password must be {MIN_PASSWORD_LENGTH}-{MAX_PASSWORD_LENGTH} characters long, "
                         f"got {len(password)}")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """True if *password* matches the stored hash (constant-time comparison of the digests)."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("stored password hash must be 'scrypt$n$r$p$salt$hash'")
    n, r, p = (int(v) for v in parts[1:4])
    salt, expected = bytes.fromhex(parts[4]), bytes.fromhex(parts[5])
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), expected)


def check_sign_in(password: str, stored: str | None) -> bool:
    """``verify_password`` against *stored*, or, with no stored hash (no such user), the same work against a
    dummy hash, answering False: the time does not depend on whether the user exists."""
    if stored is None:
        verify_password(password, _dummy_hash())
        return False
    return verify_password(password, stored)


@functools.cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(TOKEN_BYTES))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=HASH_BYTES,
                          maxmem=256 * 1024 * 1024)


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_digest(token: str) -> str:
    """What the database stores of a session token."""
    return hashlib.sha256(token.encode("ascii", errors="replace")).hexdigest()


def tokens_equal(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a submitted CSRF token with the session's."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", errors="replace"), expected.encode("utf-8"))
