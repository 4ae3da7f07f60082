"""``raddraft retry ID… | --all | --stranded``: publish dead-lettered tasks again (their ids are in ``raddraft
status``), or with ``--stranded`` every stage left between two tasks: episodes still ``prepared`` (their infer or
report message was lost, e.g. by a broker stopped the instant it handed the message over), pending draft deliveries
of reported episodes and pending deliveries of signed versions. A dead letter of a delivery task name that
``raddraft.deliver`` replaced is re-played as ``raddraft.deliver`` (workers/deadletter.py). Every task is
idempotent, so a stage that was in fact still running only runs twice."""

from __future__ import annotations

import argparse
import sys

from core.settings import Settings
from state.store import StateStore
from workers.celery_app import configure, publish
from workers.deadletter import replay


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead letter ids to re-play")
    parser.add_argument("--all", action="store_true", help="re-play every dead letter not re-played yet")
    parser.add_argument("--stranded", action="store_true",
                        help="publish again every prepared episode and pending delivery (after a broker incident)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if sum((bool(args.ids), args.all, args.stranded)) != 1:
        sys.stderr.write("raddraft retry: give dead letter ids, --all or --stranded (one of them)\n")
        return 2
    if not settings.index_path.exists():
        sys.stderr.write(f"raddraft retry: no index at {settings.index_path}\n")
        return 2
    configure(settings)
    if args.stranded:
        return _stranded(settings)
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


def _stranded(settings: Settings) -> int:
    from workers.tasks import republish_stranded  # noqa: PLC0415 - the pipeline imports the model stack (torch)

    store = StateStore(settings.index_path)
    try:
        work = republish_stranded(store)
    finally:
        store.close()
    for item in work:
        target = f" to {item.destination}" if item.destination else ""
        sys.stdout.write(f"published {item.stage} of study {item.study_uid} episode {item.episode_id}{target}\n")
    if not work:
        sys.stdout.write("no stranded work\n")
    return 0
