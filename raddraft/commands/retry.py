"""``raddraft retry ID… | --all``: publish dead-lettered tasks again (their ids are in ``raddraft status``)."""

from __future__ import annotations

import argparse
import sys

from raddraft.settings import Settings
from workers.celery_app import configure, publish
from workers.deadletter import replay


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead letter ids to re-play")
    parser.add_argument("--all", action="store_true", help="re-play every dead letter not re-played yet")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if bool(args.ids) == bool(args.all):
        sys.stderr.write("raddraft retry: give dead letter ids or --all (not both)\n")
        return 2
    if not settings.index_path.exists():
        sys.stderr.write(f"raddraft retry: no index at {settings.index_path}\n")
        return 2
    configure(settings)
    try:
        replayed = replay(settings, None if args.all else args.ids, publish)
    except KeyError as exc:
        sys.stderr.write(f"raddraft retry: {exc.args[0]}\n")
        return 2
    for item in replayed:
        sys.stdout.write(f"re-played dead letter #{item.dead_letter_id} ({item.task}) as task {item.task_id}\n")
    if not replayed:
        sys.stdout.write("no dead letters to re-play\n")
    return 0
