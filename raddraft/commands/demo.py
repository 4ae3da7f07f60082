"""``raddraft demo [--home DIR] [--exit]``: the whole gateway on three phantom studies (CR, CT, MR).

Writes the phantoms, starts ``raddraft serve`` with embedded defaults (embedded broker and model) in DIR
(default ./var/demo) on a free DICOM port, sends the studies with the storage SCU, waits for each draft and
prints its report, its findings with boxes and where the SR, GSPS, ORU and overlay PNGs are. Then it keeps
serving until Ctrl-C (``--exit`` stops at once: tests and CI). Without an HL7 destination the ORU stays in
the outbox.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from core.layout import analysis_path, episode_dir
from core.settings import Destination, Settings
from core.states import EpisodeState
from dicom_node.scu import send_instances
from model.phantoms import generate_studies, write_studies
from raddraft.model_socket import socket_path
from reporting.outputs import read_entries
from state.store import StateStore

DEMO_MODALITIES = ("CR", "CT", "MR")
MAX_SEED_TRIES = 50  # seeds tried for a phantom with findings (about one in three is normal)
START_TIMEOUT_S = 120.0
ANALYSIS_TIMEOUT_S = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, default=Path("var/demo"), help="data folder (default ./var/demo)")
    parser.add_argument("--exit", action="store_true", help="stop after printing the drafts (tests, CI)")
    parser.add_argument("--idle-seconds", type=float, default=1.0, help="study idle timeout (default 1 s)")


class _Serve:
    """``raddraft serve`` as a child process; the DICOM port is read from its log."""

    def __init__(self, home: Path, settings: Settings, idle_seconds: float) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RADDRAFT_")}
        env.update({"RADDRAFT_HOME": str(home), "RADDRAFT_DICOM_PORT": "0", "RADDRAFT_DICOM_BIND": "127.0.0.1",
                    "RADDRAFT_STUDY_IDLE_SECONDS": str(idle_seconds), "RADDRAFT_MODEL": settings.model,
                    "RADDRAFT_LOG_LEVEL": settings.log_level, "RADDRAFT_HTTP_PORT": str(settings.http_port),
                    "RADDRAFT_HTTP_BIND": settings.http_bind})
        self.process = subprocess.Popen([sys.executable, "-m", "raddraft.cli", "serve"], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.port: int | None = None
        self.worklist_url: str | None = None
        self.log = home / "serve.log"
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        with self.log.open("a", encoding="utf-8") as out:
            for line in self.process.stderr:
                out.write(line)
                out.flush()
                worklist = re.search(r"worklist listening on (http://\S+)", line)
                if worklist:
                    self.worklist_url = worklist.group(1)
                match = re.search(r"listening on [\d.]+:(\d+)", line)
                if match:
                    self.port = int(match.group(1))
                    self._ready.set()
        self._ready.set()

    def wait_ready(self) -> int:
        if not self._ready.wait(START_TIMEOUT_S) or self.port is None:
            raise RuntimeError(f"raddraft serve did not start; see {self.log}")
        return self.port

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def _wait_reported(home: Path, study_uids: list[str]) -> dict[str, str]:
    deadline = time.monotonic() + ANALYSIS_TIMEOUT_S
    done = (EpisodeState.REPORTED, EpisodeState.DELIVERED, EpisodeState.FAILED)
    while True:
        store = StateStore(home / "index.sqlite")
        try:
            states = {uid: e.state for uid in study_uids if (e := store.episode(uid, 1)) is not None}
        finally:
            store.close()
        if len(states) == len(study_uids) and all(s in done for s in states.values()):
            return {uid: str(state) for uid, state in states.items()}
        if time.monotonic() > deadline:
            raise TimeoutError(f"studies not reported within {ANALYSIS_TIMEOUT_S:.0f} s: {states}")
        time.sleep(0.5)


def _seed_with_findings(start: int, modality: str) -> int:
    """The first seed from *start* whose phantom study of *modality* has findings: a demo of normal studies
    shows nothing of the product (boxes, grounded sentences)."""
    for seed in range(start, start + MAX_SEED_TRIES):
        [study] = generate_studies(seed, 1, modality)
        if study.findings:
            return seed
    return start


def _print_study(out: object, home: Path, modality: str, study_uid: str, state: str) -> None:
    write = out.write  # type: ignore[attr-defined]
    folder = episode_dir(home / "outbox", study_uid, 1)
    write(f"\n=== {modality} study {study_uid}: {state}\n")
    analysis = analysis_path(home, study_uid, 1)
    if not analysis.is_file():
        write("  no analysis (see 'raddraft status' for the error)\n")
        return
    result = json.loads(analysis.read_text())
    write(f"  DRAFT REPORT (preliminary, model {result['model']['name']} {result['model']['version']}):\n")
    sentences = result["report"].get("sentences", [])
    if not sentences:
        write(f"    FINDINGS: {result['report']['findings']}\n    IMPRESSION: {result['report']['impression']}\n")
    for section in ("findings", "impression"):
        mine = [(n, s) for n, s in enumerate(sentences) if s["section"] == section]
        if mine:
            write(f"    {section.upper()}:\n")
        for _, sentence in mine:
            boxes = ", ".join(f"box {i + 1}" for i in sentence["findings"])
            status = {"grounded": f"grounded: {boxes}", "text_only": "TEXT ONLY: not localized by the AI",
                      "statement": sentence["polarity"]}[sentence["status"]]
            write(f"      [{status}] {sentence['text']}\n")
    consistency = result.get("consistency")
    if consistency:
        flag = "  << text and boxes disagree: check before signing" if (
            consistency["text_only"] or consistency["box_only"]) else ""
        write(f"  consistency: {consistency['grounded']} grounded, {consistency['text_only']} text only, "
              f"{consistency['box_only']} box only{flag}\n")
    write(f"  {len(result['findings'])} finding(s):\n")
    for number, finding in enumerate(result["findings"], start=1):
        box = ", ".join(f"{v:.0f}" for v in finding["box"])
        side = f" ({finding['laterality']})" if finding.get("laterality") else ""
        frame = f" frame {finding['frame_number']}" if finding.get("frame_number") else ""
        stated = ("localized, NOT IN THE TEXT" if finding.get("status") == "box_only" else
                  f"stated in sentence(s) {', '.join(str(i + 1) for i in finding.get('sentences', []))}"
                  if finding.get("sentences") else "")
        via = " [found by the follow-up question]" if finding.get("source") == "detection" else ""
        write(f"    box {number}: {finding['label']}{side} ({box}) on {finding['sop_instance_uid']}{frame}"
              f"{' - ' + stated if stated else ''}{via}\n")
    entries = read_entries(folder)  # the draft set as the outbox index lists it
    for kind, label in (("sr", "SR:      "), ("narrative", "narrative:"), ("gsps", "GSPS:    "), ("hl7", "ORU:     "),
                        ("overlay", "overlay: ")):
        for entry in entries:
            if entry.kind == kind:
                write(f"  {label} {entry.path}\n")


def run(args: argparse.Namespace, settings: Settings) -> int:
    home: Path = args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    out = sys.stdout
    studies: list[tuple[str, str, list[Path]]] = []
    for seed, modality in enumerate(DEMO_MODALITIES, start=1):  # a seed each: distinct studies
        folder = home / "phantoms" / f"{int(time.time())}-{modality}"
        files = write_studies(folder, seed=_seed_with_findings(int(time.time()) + 1000 * seed, modality), count=1,
                              modality=modality)
        truth = json.loads((folder / "truth.json").read_text())["studies"][0]
        studies.append((modality, truth["study_uid"], files))
    out.write(f"wrote {len(studies)} phantom studies under {home / 'phantoms'}\n")
    serve = _Serve(home, settings, args.idle_seconds)
    try:
        port = serve.wait_ready()
        out.write(f"raddraft serve listening on 127.0.0.1:{port} (log {serve.log})\n")
        destination = Destination(ae_title=settings.ae_title, host="127.0.0.1", port=port)
        for modality, _, files in studies:
            summary = send_instances(destination, files, calling_ae_title="DEMOSCU")
            out.write(f"sent {modality}: {summary.describe()}\n")
        out.flush()
        states = _wait_reported(home, [uid for _, uid, _ in studies])
        for modality, uid, _ in studies:
            _print_study(out, home, modality, uid, states[uid])
        out.write("\nAI drafts are PRELIMINARY until a radiologist signs them.\n")
        if serve.worklist_url:
            out.write(f"worklist: {serve.worklist_url}/ (add a user first: raddraft user add NAME --role radiologist "
                      f"--password-stdin, with RADDRAFT_HOME={home})\n")
        if socket_path(home).is_socket():  # raddraft/model_socket.py: answered by this gateway's loaded model
            out.write(f"analyse an image with the gateway's model: RADDRAFT_HOME={home} raddraft analyze "
                      f"{studies[0][2][0]}\n")
        if not args.exit:
            out.write("serving; press Ctrl-C to stop\n")
            out.flush()
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C reaches serve too: it shuts down cleanly
                serve.process.wait()
    finally:
        code = serve.stop()
    return 0 if code in (0, -signal.SIGTERM) else code
