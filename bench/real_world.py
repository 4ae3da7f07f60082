"""Real DICOM that nobody here wrote, the way a hospital integration engineer tries a gateway: pydicom's test
files, as shipped, uploaded to a real Orthanc, which C-STOREs each study to ``raddraft serve`` (embedded broker,
in-process workers, an HL7 destination that acknowledges everything). Waits until no episode is in flight, then
prints one row per end state (with the reasons), the delivery states, the dead letters and the studies that
came back into Orthanc with results (an SR of raddraft's).

    .venv/bin/python -m bench.real_world [--limit N] [--json OUT]

Done when no study is stuck in flight, no dead letter, and every CR/DX/CT/MR grey-scale image study came back
with results.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import urllib.error
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data

from peers import Orthanc, wait_for
from peers.gateway import base_env, connect_orthanc, gateway
from peers.mllp import MLLPListener

log = logging.getLogger("bench.real_world")
BUNDLED = Path(pydicom.data.__file__).resolve().parent / "test_files"
END_STATES = ("delivered", "not-analysed", "failed")
ANALYSED_MODALITIES = ("CR", "DX", "CT", "MR")


def test_files(limit: int | None = None) -> list[Path]:
    """Every DICOM file of the test data bundled in the installed pydicom package (read from its folder, never
    through ``get_testdata_files``, which downloads the external pydicom-data set when it is missing); files
    pydicom cannot read as DICOM are left out."""
    files = []
    for path in sorted(BUNDLED.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in (".dcm", ""):
            continue
        try:
            pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except Exception:  # not DICOM: the bench only wants what a PACS could hold
            continue
        files.append(path)
    return files[:limit] if limit else files


def upload_all(orthanc: Orthanc, files: list[Path]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Upload each file; returns Orthanc study id -> what the files say of it, and the files Orthanc refused."""
    studies: dict[str, dict[str, Any]] = {}
    refused = []
    for path in files:
        try:
            answer = orthanc.upload(path)
        except (urllib.error.HTTPError, OSError, ValueError):
            refused.append(path.name)
            continue
        if isinstance(answer, list):
            answer = answer[0]
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        entry = studies.setdefault(answer["ParentStudy"], {"files": [], "modalities": set(), "grey_images": 0,
                                                            "study_uid": str(ds.get("StudyInstanceUID", ""))})
        entry["files"].append(path.name)
        entry["modalities"].add(str(ds.get("Modality", "")))
        if ("Rows" in ds and str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME")
                and str(ds.get("Modality", "")) in ANALYSED_MODALITIES):
            entry["grey_images"] += 1
    return studies, refused


def status(home: Path) -> dict[str, Any]:
    from core.settings import Settings  # noqa: PLC0415
    from raddraft.commands.status import collect  # noqa: PLC0415 (after the environment is set)

    return collect(Settings(home=home))


def run(limit: int | None, timeout: float, send_again: bool = False) -> dict[str, Any]:
    """Send every study once (and with *send_again* a second time, after every episode ended, as Orthanc holds it
    then: with raddraft's SR, narrative and GSPS) and report what came back."""
    files = test_files(limit)
    with tempfile.TemporaryDirectory(prefix="raddraft-real-") as tmp, MLLPListener() as listener:
        root = Path(tmp)
        with Orthanc(root / "orthanc") as orthanc:
            studies, refused = upload_all(orthanc, files)
            home = root / "home"
            env = base_env(home, RADDRAFT_HL7_DESTINATIONS=f"127.0.0.1:{listener.port}",
                           RADDRAFT_DICOM_DESTINATIONS=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
            with gateway(home, env) as serve:
                connect_orthanc(orthanc, serve.port)
                started = time.monotonic()
                for study_id in studies:
                    try:
                        orthanc.store_to("raddraft", [study_id])
                    except (urllib.error.HTTPError, OSError) as exc:
                        studies[study_id]["store_error"] = str(exc)
                wanted = sum(1 for s in studies.values() if "store_error" not in s)

                def settled() -> dict[str, Any] | None:
                    document = status(home)
                    states = [row["state"] for row in document["studies"]]
                    pending = [d for d in document["deliveries"] if d["state"] == "pending"]
                    recorded = {row["study_instance_uid"] for row in document["studies"]}
                    if len(recorded | set(document["studies_without_episode"])) < wanted:
                        return None
                    if all(state in END_STATES for state in states) and not pending:
                        return document
                    return None

                try:
                    document = wait_for(settled, timeout=timeout, interval=2.0, what="every episode ended")
                except TimeoutError:
                    document = status(home)
                elapsed = time.monotonic() - started
                resend: dict[str, Any] = {}
                if send_again:  # the PACS sends each study back, raddraft's own outputs included
                    episodes_before = len(document["studies"])
                    for study_id in studies:
                        if "store_error" not in studies[study_id]:
                            try:
                                orthanc.store_to("raddraft", [study_id])
                            except (urllib.error.HTTPError, OSError) as exc:
                                resend.setdefault("store_errors", []).append(str(exc)[:120])
                    again = status(home)
                    resend.update(episodes_before=episodes_before, episodes_after=len(again["studies"]),
                                  node=again["node"])
            with_results = set()
            for study_id in studies:
                series = orthanc.get(f"/studies/{study_id}/series")
                if any(s["MainDicomTags"].get("Modality") == "SR" and "AI findings" in
                       s["MainDicomTags"].get("SeriesDescription", "") for s in series):
                    with_results.add(study_id)
    by_uid = {s["study_uid"]: (sid, s) for sid, s in studies.items()}
    rows = []
    for row in document["studies"]:
        sid, info = by_uid.get(row["study_instance_uid"], ("", {}))
        rows.append({"state": row["state"], "reason": row["error"] or "", "results_in_orthanc": sid in with_results,
                     "modalities": sorted(info.get("modalities", [])), "grey_images": info.get("grey_images", 0),
                     "files": info.get("files", [])})
    store_errors = [f"{s['files'][0]}: {s['store_error'][:120]}" for s in studies.values() if "store_error" in s]
    seen = {row["study_instance_uid"] for row in document["studies"]} | set(document["studies_without_episode"])
    never_arrived = [s["files"] for s in studies.values() if "store_error" not in s and s["study_uid"] not in seen]
    return {"files": len(files), "refused_by_orthanc": refused, "studies": len(studies), "seconds": elapsed,
            "store_errors": store_errors, "never_arrived": never_arrived,
            "without_episode": [by_uid.get(uid, ("", {}))[1].get("files", [uid])
                                for uid in document["studies_without_episode"]],
            "rows": rows, "deliveries": Counter(f"{d['kind']} {d['state']}" for d in document["deliveries"]),
            "dead_letters": [d["error"] for d in document["dead_letters"]],
            "hl7_messages": len(listener.received), "send_again": resend}


def print_table(report: dict[str, Any]) -> None:
    out = sys.stdout
    out.write(f"{report['files']} files, {report['studies']} studies in Orthanc "
              f"({len(report['refused_by_orthanc'])} files refused by Orthanc), {report['seconds']:.0f} s\n")
    table = Counter((r["state"], r["results_in_orthanc"]) for r in report["rows"])
    out.write(f"{'END STATE':<14} {'RESULTS IN ORTHANC':<19} STUDIES\n")
    for (state, results), count in sorted(table.items()):
        out.write(f"{state:<14} {'yes' if results else 'no':<19} {count}\n")
    out.write("reasons:\n")
    for reason, count in Counter(r["reason"] for r in report["rows"] if r["reason"]).most_common():
        out.write(f"  {count:>3}  {reason[:150]}\n")
    missing = [r for r in report["rows"] if r["grey_images"] and not r["results_in_orthanc"]]
    out.write(f"CR/DX/CT/MR grey-scale image studies without results: {len(missing)}\n")
    for r in missing:
        out.write(f"  {r['state']}: {r['files']} {r['reason'][:120]}\n")
    out.write(f"deliveries: {dict(report['deliveries'])}; HL7 messages received: {report['hl7_messages']}\n")
    out.write(f"studies Orthanc could not send to raddraft: {len(report['store_errors'])}\n")
    for error in report["store_errors"]:
        out.write(f"  {error}\n")
    out.write(f"studies stored without analysis (AI/derived objects only, no episode): "
              f"{len(report['without_episode'])}\n")
    for names in report["without_episode"]:
        out.write(f"  {names}\n")
    out.write(f"studies sent that raddraft never recorded: {len(report['never_arrived'])}\n")
    for names in report["never_arrived"]:
        out.write(f"  {names}\n")
    if report["send_again"]:
        again = report["send_again"]
        out.write(f"every study sent again with raddraft's outputs: episodes {again['episodes_before']} -> "
                  f"{again['episodes_after']}; node counts {again['node']}\n")
    out.write(f"dead letters: {len(report['dead_letters'])}\n")
    for error in report["dead_letters"]:
        out.write(f"  {error[:150]}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="only the first N test files")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds to wait for every episode to end")
    parser.add_argument("--json", type=Path, default=None, help="write the whole report here")
    parser.add_argument("--send-again", action="store_true",
                        help="then send every study again, as Orthanc holds it with raddraft's outputs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run(args.limit, args.timeout, args.send_again)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=sorted))
    stuck = [r for r in report["rows"] if r["state"] not in END_STATES]
    return 1 if stuck or report["dead_letters"] else 0


if __name__ == "__main__":
    sys.exit(main())
