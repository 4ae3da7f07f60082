"""The report stage reads each file it needs from disk once (issue 18, "outputs re-derived").

One study goes through prepare and a stand-in gpu answer, then the report stage, with every ``open`` of the process
watched through the interpreter's audit hook (``sys.addaudithook``, the "open" event: instrumentation of the real
reads, no component replaced). The stage reads the manifest once, the request once (the result it assembles is
written, not read back: the worklist registration gets the objects) and each spooled instance once; a re-run after
an interrupted one reads the kept analysis once instead of the request. Before, the manifest was read twice and the
analysis written and read back once by the worklist registration.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from test_pipeline_gate import _prepared

from core.layout import analysis_path, manifest_path, request_path
from core.result import ModelIdentity
from core.settings import Destination
from core.states import EpisodeState
from model import analyze
from model.payload import InferenceRequest, InferenceResponse, TaskOutput
from peers import StoreSCP
from state.store import StateStore
from workers import delivery, pipeline

IDENTITY = ModelIdentity(name="test", version="test", parameters={})
_WATCH: list[Counter[str]] = []  # the counters of the reads being watched (an audit hook cannot be removed)
_LOCK = threading.Lock()


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event != "open" or not _WATCH:
        return
    path, mode, flags = args
    if not isinstance(path, (str, bytes, os.PathLike)):
        return  # an open file descriptor (os.fdopen of a temporary file being written)
    if isinstance(mode, str):
        reading = not any(c in mode for c in "wax+")
    else:
        reading = isinstance(flags, int) and flags & os.O_ACCMODE == os.O_RDONLY and not flags & os.O_DIRECTORY
    if reading:
        with _LOCK:
            for counter in _WATCH:
                counter[os.fsdecode(path)] += 1


sys.addaudithook(_audit)


@contextmanager
def counting_reads() -> Iterator[Counter[str]]:
    """Every file opened for reading while the block runs, with how often."""
    counter: Counter[str] = Counter()
    _WATCH.append(counter)
    try:
        yield counter
    finally:
        _WATCH.remove(counter)


def _response(request: InferenceRequest) -> InferenceResponse:
    grounding = next(task.task_id for task in request.tasks if task.task_id.startswith("grounding:"))
    texts = {task.task_id: "no finding" for task in request.tasks}
    texts[grounding] = "<p>mass</p> {<20><20><60><60>}"
    texts[analyze.REPORT_TASK_ID] = "FINDINGS: A mass. IMPRESSION: Mass."
    return InferenceResponse(request_id=request.request_id, study_instance_uid=request.study_instance_uid,
                             episode_id=request.episode_id, model=IDENTITY, batch_rows=len(texts), seconds=0.1,
                             outputs=[TaskOutput(task_id=k, text=v) for k, v in texts.items()])


def _reads_of(counter: Counter[str], path: Path) -> int:
    return counter[str(path)]


def _home_reads(counter: Counter[str], home: Path) -> Counter[str]:
    """The reads of files under *home* (the spool, the work folder, the outbox, the databases), not of code."""
    return Counter({path: n for path, n in counter.items() if Path(path).is_relative_to(home)})


def test_the_report_stage_reads_each_file_once(tmp_path: Path) -> None:
    settings, study = _prepared(tmp_path, ["CT_small.dcm"])
    request = pipeline.prepare_request(settings, study, 1)
    response = _response(request)
    files = {name: path(settings.home, study, 1) for name, path in (
        ("manifest.json", manifest_path), ("request.json", request_path), ("analysis.json", analysis_path))}
    spooled = settings.spool_dir / "CT_small.dcm"

    sent: list[tuple[str, list[object], str]] = []  # the worklist's announcements: read in the worklist's stage

    def publish(name: str, args: list[object], task_id: str) -> None:
        sent.append((name, args, task_id))

    with counting_reads() as reads:
        outcome = pipeline.report_episode(settings, response, publish=publish)
    assert outcome is not None and not outcome.reused and outcome.result.findings
    assert {name: _reads_of(reads, path) for name, path in files.items()} == {
        "manifest.json": 1, "request.json": 1, "analysis.json": 0}
    assert _reads_of(reads, spooled) == 1
    outbox = outcome.entries[0].path.parent
    assert not [path for path in reads if Path(path).parent == outbox]  # no output read back after it was written
    assert max(_home_reads(reads, tmp_path).values()) == 1, _home_reads(reads, tmp_path).most_common(3)
    assert [name for name, _, _ in sent] == ["worklist.draft_ready"]

    # a re-run of an interrupted stage keeps the analysis it wrote: read once, the request not at all
    store = StateStore(settings.index_path)
    try:
        store.set_state(study, 1, EpisodeState.PREPARED, 0.0)
    finally:
        store.close()
    with counting_reads() as again:
        rerun = pipeline.report_episode(settings, response, publish=publish)
    assert rerun is not None and rerun.reused
    assert {name: _reads_of(again, path) for name, path in files.items()} == {
        "manifest.json": 1, "request.json": 0, "analysis.json": 1}
    assert max(_home_reads(again, tmp_path).values()) == 1, _home_reads(again, tmp_path).most_common(3)
    assert [(e.path, e.sop_instance_uid) for e in rerun.entries] == [
        (e.path, e.sop_instance_uid) for e in outcome.entries]  # idempotent: the same UIDs


def test_the_delivery_stage_reads_the_outbox_index_and_each_output_once(tmp_path: Path) -> None:
    """A draft SR set sent to a real dcmtk storescp: the index once, each DICOM output at most twice (pynetdicom's
    SCU reads a file's header to propose its context, then sends the file), nothing else of the home."""
    settings, study = _prepared(tmp_path, ["CT_small.dcm"])
    with StoreSCP(tmp_path / "storescp") as scp:
        settings = settings.model_copy(update={"dicom_destinations": [
            Destination(ae_title="STORESCP", host="127.0.0.1", port=scp.port)]})
        request = pipeline.prepare_request(settings, study, 1)
        outcome = pipeline.report_episode(settings, _response(request), publish=lambda *_: None)
        assert outcome is not None
        store = StateStore(settings.index_path)
        try:
            [row] = [d for d in store.deliveries(study, 1) if d.kind == "dicom"]
            with counting_reads() as reads:
                assert delivery.run(settings, store, row.key, publish=lambda *_: None)
        finally:
            store.close()
    home = _home_reads(reads, settings.home)
    index = outcome.entries[0].path.parent / "outbox.json"
    assert home.pop(str(index)) == 1
    sent = {str(entry.path) for entry in outcome.entries if entry.delivery == "dicom"}
    assert set(home) - sent <= {str(settings.index_path)}, home  # only the outputs (and the state database)
    assert all(home[path] <= 2 for path in sent), home
