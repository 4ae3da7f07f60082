"""``raddraft user add NAME --role radiologist|admin [--password-stdin]``, ``raddraft user passwd NAME``,
``raddraft user unlock NAME`` and ``raddraft user list``.

Without ``--password-stdin`` the password is asked twice on the terminal (never on the command line, where
other users could read it in the process list). A new password ends the user's sessions. ``unlock`` lets a user
locked by ``login_max_failures`` failed sign-ins sign in again (audited as ``unlock`` by ``cli``).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
from datetime import UTC, datetime

from core.settings import Settings
from worklist.auth import Role, check_username, hash_password
from worklist.storage import Store, UserExistsError

log = logging.getLogger(__name__)

CLI_AUDIT_NAME = "cli"  # the audit log's user name for changes made with this command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    add = sub.add_parser("add", help="create a worklist user")
    add.add_argument("name", help="user name (letters, digits, '.', '_', '-')")
    add.add_argument("--role", required=True, choices=[r.value for r in Role])
    add.add_argument("--full-name", help="DICOM person name written as verifying observer, e.g. 'Curie^Marie' "
                                         "(default: the user name)")
    add.add_argument("--organization", help="verifying organization (default: hl7_sending_facility)")
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    passwd = sub.add_parser("passwd", help="set a user's password")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true")
    unlock = sub.add_parser("unlock", help="let a user locked after failed sign-ins sign in again")
    unlock.add_argument("name")
    listing = sub.add_parser("list", help="list worklist users")
    listing.add_argument("--json", action="store_true", help="machine-readable output")


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != first:
        raise ValueError("the two passwords differ")
    return first


def run(args: argparse.Namespace, settings: Settings) -> int:
    store = Store.from_settings(settings)
    try:
        if args.user_command == "list":
            return _list(store, args.json)
        try:
            name = check_username(args.name)
            if args.user_command == "unlock":
                unlocked = store.unlock_user(name, CLI_AUDIT_NAME, datetime.now(UTC))
                sys.stdout.write(f"{name} unlocked\n" if unlocked else f"{name} was not locked\n")
                log.info("worklist user %s unlocked from the command line", name)
                return 0
            password_hash = hash_password(_read_password(args.password_stdin))
            if args.user_command == "passwd":
                ended = store.set_password(name, password_hash)
                sys.stdout.write(f"password of {name} changed; {ended} session(s) signed out\n")
                log.info("password of worklist user %s changed, %d session(s) ended", name, ended)
                return 0
            full_name = args.full_name or name
            if "\n" in full_name or len(full_name) > 320:
                raise ValueError("--full-name must be one line of at most 320 characters (DICOM PN)")
            user = store.add_user(name, args.role, password_hash, full_name=full_name,
                                  organization=args.organization or settings.hl7_sending_facility,
                                  now=datetime.now(UTC))
        except (ValueError, KeyError) as exc:  # UserExistsError is a ValueError
            sys.stderr.write(f"raddraft user: {exc.args[0] if isinstance(exc, KeyError) else exc}\n")
            return 1 if isinstance(exc, UserExistsError) else 2
        sys.stdout.write(f"added {user.username} ({user.role})\n")
        log.info("worklist user %s added with role %s", user.username, user.role)
        return 0
    finally:
        store.close()


def _list(store: Store, as_json: bool) -> int:
    users = store.list_users()
    if as_json:
        sys.stdout.write(json.dumps([{"name": u.username, "role": u.role, "full_name": u.full_name,
                                      "organization": u.organization, "disabled": u.disabled, "locked": u.locked}
                                     for u in users],
                                    indent=2) + "\n")
        return 0
    for user in users:
        sys.stdout.write(f"{user.username:24} {user.role:12} {user.full_name} / {user.organization}"
                         f"{' (disabled)' if user.disabled else ''}{' (locked)' if user.locked else ''}\n")
    return 0
