"""``raddraft status [--json]``: studies with the state of each episode and their counts, the deliveries, the
dead-letter table (tasks that failed for good; re-play them with ``raddraft retry``) and what the DICOM node
turned away, stored once or stored without analysis (rejected presentation contexts, identical re-sends, refused
instances, AI/derived objects), and the state of ``raddraft serve``'s workers: its io and gpu worker processes
with the embedded broker, or its in-process worker with the SQLite transport (running, restarting, stalled, dead
since …, with their restarts)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, TextIO

from core.layout import inprocess_worker_state_path
from core.settings import Settings
from dicom_node.index import Index, NodeCounter
from reporting.outputs import episode_problems
from state.store import StateStore
from workers.inprocess import read_state

STORED_WITHOUT_ANALYSIS = "stored_without_analysis"  # AI/derived objects: stored, no episode (dicom_node/derived.py)
# the line of each count of the DICOM node in the text output
COUNTER_LABELS: dict[str, str] = {
    NodeCounter.REJECTED_CONTEXTS: "rejected presentation contexts",
    NodeCounter.IDENTICAL_RESENDS: "identical re-sends",
    NodeCounter.REFUSED_INSTANCES: "refused instances",
    STORED_WITHOUT_ANALYSIS: "stored without analysis (AI/derived objects)",
}


DEFAULT_LIMIT = 100  # episodes listed: the most recently opened ones (the totals count every episode)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                        help=f"list the LIMIT most recently opened episodes (default {DEFAULT_LIMIT})")


def collect(settings: Settings, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """The status document: one entry per study episode (the *limit* most recently opened), plus totals per state.

    What it reads does not grow with the history in the index: the listed episodes and their studies' counts
    through indexes, the totals kept by the index (dicom_node/index.py) and the episodes' state index."""
    worker = read_state(inprocess_worker_state_path(settings.home))
    if not settings.index_path.exists():
        return {"studies": [], "totals": {}, "instances": 0, "deliveries": [], "dead_letters": [],
                "node": {name: 0 for name in COUNTER_LABELS}, "studies_without_episode": [],
                "inprocess_worker": worker}
    store = StateStore(settings.index_path)
    index = Index(store)
    try:
        episodes = store.recent_episodes(limit)
        counts = index.study_counts({episode.study_instance_uid for episode in episodes})
        totals = store.episode_totals()
        without_episode = index.studies_without_episode(limit)
        total_instances = index.count_instances()
        # the listed episodes' deliveries, and every unfinished one however old: never the finished history
        deliveries = [d for episode in episodes for d in store.deliveries(episode.study_instance_uid,
                                                                          episode.episode_id)]
        listed = {(d.study_instance_uid, d.episode_id) for d in deliveries}
        deliveries += [d for d in store.unfinished_deliveries()
                       if (d.study_instance_uid, d.episode_id) not in listed]
        dead_letters = store.dead_letters()
        counters: dict[str, int] = {str(counter): count for counter, count in index.counters().items()}
        counters[STORED_WITHOUT_ANALYSIS] = index.count_instances_without_episode()
    finally:
        store.close()
    rows = []
    for episode in episodes:
        instances, series = counts.get(episode.study_instance_uid, (0, 0))
        rows.append({
            "study_instance_uid": episode.study_instance_uid,
            "episode": episode.episode_id,
            "state": str(episode.state),
            "received_in_episode": episode.received,
            "study_instances": instances,
            "study_series": series,
            "last_received": _iso(episode.last_received_at),
            "handed_off": episode.published_at is not None,
            "handoff_attempts": episode.attempts,
            "error": episode.last_error,
            "outputs_not_built": _problems(settings, episode.study_instance_uid, episode.episode_id),
        })
    return {
        "studies": rows, "totals": dict(sorted(totals.items())), "instances": total_instances,
        "deliveries": [{"study_instance_uid": d.study_instance_uid, "episode": d.episode_id, "kind": d.kind,
                        "output_set": d.output_set, "destination": d.destination, "state": str(d.state),
                        "attempts": d.attempts, "error": d.last_error} for d in deliveries],
        "dead_letters": [{"id": d.id, "task": d.task, "task_id": d.task_id, "study_instance_uid": d.study_instance_uid,
                          "episode": d.episode_id, "retries": d.retries, "error": d.error,
                          "at": _iso(d.at)} for d in dead_letters],
        "node": counters,
        # studies of which only AI/derived objects were received: stored, nothing to analyse
        "studies_without_episode": without_episode,
        # raddraft serve's in-process worker (workers/inprocess.py), None when serve never ran one here
        "inprocess_worker": worker,
    }


def _problems(settings: Settings, study_uid: str, episode_id: int) -> list[dict[str, str]]:
    """The outputs the report stage could not build (or skipped) for the episode, with their reasons."""
    return [asdict(problem) for problem in episode_problems(settings.outbox_dir, study_uid, episode_id)]


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def run(args: argparse.Namespace, settings: Settings) -> int:
    document = collect(settings, getattr(args, "limit", DEFAULT_LIMIT))  # a Namespace built without --limit too
    out = sys.stdout
    if args.json:
        json.dump(document, out, indent=2)
        out.write("\n")
        return 0
    if not document["studies"]:
        out.write(f"no studies in {settings.home}\n")
        _write_node_counters(out, document["node"])
        _write_worker(out, document["inprocess_worker"])
        return 0
    out.write(f"{'STUDY INSTANCE UID':<64}  {'EP':>3}  {'STATE':<10}  {'INST':>5}  {'SER':>4}  LAST RECEIVED\n")
    for row in document["studies"]:
        line = (f"{row['study_instance_uid']:<64}  {row['episode']:>3}  {row['state']:<10}  "
                f"{row['study_instances']:>5}  {row['study_series']:>4}  {row['last_received']}")
        if row["error"]:
            line += f"  ({row['error']})"
        out.write(line + "\n")
        for problem in row["outputs_not_built"]:
            out.write(f"    {problem['kind']} {problem['state']}: {problem['reason']}\n")
    totals = ", ".join(f"{state} {count}" for state, count in document["totals"].items())
    episodes = sum(document["totals"].values())
    out.write(f"{episodes} episode(s): {totals}; {document['instances']} instance(s) stored\n")
    if episodes > len(document["studies"]):
        out.write(f"(the {len(document['studies'])} most recently opened listed: --limit)\n")
    unfinished = [d for d in document["deliveries"] if d["state"] not in ("done", "skipped")]
    skipped = [d for d in document["deliveries"] if d["state"] == "skipped"]
    if skipped:
        out.write(f"{len(skipped)} delivery(ies) skipped: nothing of that kind was built (see the outputs above)\n")
    for row in unfinished:
        which = "" if row["output_set"] == "draft" else f" ({row['output_set'].replace(':', ' version ')})"
        out.write(f"delivery {row['state']}: {row['kind']}{which} to {row['destination']} of "
                  f"{row['study_instance_uid']} episode {row['episode']} after {row['attempts']} attempt(s)"
                  + (f" ({row['error']})" if row["error"] else "") + "\n")
    if document["dead_letters"]:
        out.write(f"{len(document['dead_letters'])} dead letter(s) (re-play with 'raddraft retry ID' or --all):\n")
        for row in document["dead_letters"]:
            out.write(f"  #{row['id']}  {row['task']}  {row['study_instance_uid']} episode {row['episode']}  "
                      f"{row['at']}  after {row['retries']} retry(ies): {row['error']}\n")
    _write_node_counters(out, document["node"])
    _write_worker(out, document["inprocess_worker"])
    return 0


def _write_worker(out: TextIO, worker: dict[str, Any] | None) -> None:
    """One line on raddraft serve's in-process worker, or one per worker process it runs (the embedded broker:
    workers/supervisor.py): running, restarting, stalled, dead since …, stopped."""
    if worker is None:
        return
    if "workers" in worker:
        for child in worker["workers"]:
            out.write(f"{child['queue']} worker process: {_child_line(worker, child)}\n")
        return
    state, restarts = worker.get("state"), worker.get("restarts", 0)
    since = _iso(worker["since"]) if worker.get("since") else "?"
    beat = f"last heartbeat {_iso(worker['heartbeat'])}" if worker.get("heartbeat") else "no heartbeat yet"
    if state == "unknown":
        line = f"unknown: {worker.get('error')}"
    elif not worker["process_running"] and state != "stopped":
        line = f"not running: the serve process {worker.get('pid')} has ended (it was {state} since {since})"
    elif state == "dead":
        line = (f"dead since {since} after {restarts} restart(s) ({worker.get('last_error')}); nothing is "
                "processed until raddraft serve is restarted")
    elif state == "restarting":
        line = f"restarting since {since} ({worker.get('last_error')}), {restarts} restart(s)"
    elif state == "stalled":
        line = f"stalled since {since}: its consumer loop does not turn ({beat}), {restarts} restart(s)"
    elif state == "stopped":
        line = f"stopped since {since}"
    else:
        line = f"{state} since {since}, {beat}, {restarts} restart(s)"
    out.write(f"in-process worker: {line}\n")


def _child_line(document: dict[str, Any], child: dict[str, Any]) -> str:
    state, restarts = child.get("state"), child.get("restarts", 0)
    since = _iso(child["since"]) if child.get("since") else "?"
    if not document["process_running"] and state != "stopped":
        return f"not running: the serve process {document.get('pid')} has ended (it was {state} since {since})"
    if state == "dead":
        return (f"dead since {since} after {restarts} restart(s) ({child.get('last_error')}); its queue is not "
                "consumed until raddraft serve is restarted")
    if state == "restarting":
        return f"restarting since {since} ({child.get('last_error')}), {restarts} restart(s)"
    if state == "stopped":
        return f"stopped since {since}"
    return f"{state} since {since}, pid {child.get('pid')}, {restarts} restart(s)"


def _write_node_counters(out: TextIO, counts: dict[str, int]) -> None:
    """What the DICOM node turned away or stored once, one ``label: N`` line each."""
    for name, label in COUNTER_LABELS.items():
        out.write(f"{label}: {counts.get(name, 0)}\n")
