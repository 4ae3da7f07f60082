"""Grounding after generation (model/analyze.py, model/grounding.py): a stated finding the [grounding] answers
missed is asked again as ``[detection] <label>`` on every analysed slice; the box found joins the findings and
grounds the sentence, and no box leaves the sentence text-only and the draft flagged. The outputs built from
such a result say so (SR, ORU)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from node_helpers import PYDICOM_TEST_FILES
from pipeline_infra_helpers import TINY, request, tiny_model_folder
from pydicom.dataset import Dataset

from core.result import ModelIdentity
from model import analyze
from model.embedded import LoadedModel
from model.payload import InferenceRequest, InferenceResponse, TaskOutput
from workers import inference

IDENTITY = ModelIdentity(name="test", version="test", parameters={})
NODULE_REPORT = ("FINDINGS: Solid nodule in the right upper lobe measuring 11 mm. No pleural effusion. "
                 "IMPRESSION: Solitary right pulmonary nodule.")


@pytest.fixture(scope="module")
def slices() -> list[Dataset]:
    return [pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")]


def local(slices: list[Dataset]) -> InferenceRequest:
    """The request of one CT image, as ``raddraft analyze`` builds it (report + one grounding task)."""
    return analyze.local_request([slices[0]], TINY.vision.image_size)


def respond(req: InferenceRequest, texts: dict[str, str]) -> InferenceResponse:
    return InferenceResponse(request_id=req.request_id, study_instance_uid=req.study_instance_uid,
                             episode_id=req.episode_id, model=IDENTITY, batch_rows=len(texts), seconds=0.1,
                             outputs=[TaskOutput(task_id=k, text=v) for k, v in texts.items()])


def grounding_ids(req: InferenceRequest) -> list[str]:
    return [task.task_id for task in req.tasks if task.task == "grounding"]


def test_a_stated_label_without_a_box_is_asked_again_on_every_slice(slices: list[Dataset]) -> None:
    req = local(slices)
    texts = {"report": NODULE_REPORT, **{tid: "none" for tid in grounding_ids(req)}}
    follow_ups = analyze.follow_up_tasks(req, texts)
    assert [(t.task, t.instruction) for t in follow_ups] == [("detection", "[detection] nodule")] * len(
        grounding_ids(req))
    assert {t.image for t in follow_ups} == {t.image for t in req.tasks if t.task == "grounding"}
    # the grounding answer already has the nodule (image left = patient's right): nothing to ask
    boxed = {**texts, **{tid: "<p>nodule</p> {<10><10><30><30>}" for tid in grounding_ids(req)}}
    assert analyze.follow_up_tasks(req, boxed) == []
    # a nodule on the other side does not ground a sentence that says right
    left = {**texts, **{tid: "<p>nodule</p> {<70><10><90><30>}" for tid in grounding_ids(req)}}
    assert [t.instruction for t in analyze.follow_up_tasks(req, left)] == ["[detection] nodule"]
    # a normal report asks nothing
    assert analyze.follow_up_tasks(req, {**texts, "report": "FINDINGS: The lungs are clear. IMPRESSION: Normal."}
                                   ) == []


def test_the_box_found_by_the_follow_up_grounds_the_sentence(slices: list[Dataset]) -> None:
    req = local(slices)
    [grounding] = grounding_ids(req)
    key = grounding.removeprefix(analyze.GROUNDING_PREFIX)
    texts = {"report": NODULE_REPORT, grounding: "none",
             f"{analyze.DETECTION_PREFIX}nodule@{key}": "<p>nodule</p> {<10><10><30><30>}"}
    result = analyze.assemble(req, respond(req, texts), sources=[slices[0]])
    [finding] = result.findings
    assert (finding.label, finding.source, finding.laterality, finding.status) == (
        "nodule", "detection", "right", "grounded")
    assert [s.status for s in result.report.sentences] == ["grounded", "statement", "grounded"]
    assert result.consistency is not None and not result.consistency.flagged
    # the evaluation's "before grounding": the same answers without the follow-up boxes
    before = analyze.assemble(req, respond(req, texts), sources=[slices[0]], follow_ups=False)
    assert before.findings == [] and before.consistency is not None and before.consistency.text_only == 2


def test_no_box_from_the_follow_up_leaves_the_statement_text_only_and_flagged(slices: list[Dataset]) -> None:
    req = local(slices)
    [grounding] = grounding_ids(req)
    key = grounding.removeprefix(analyze.GROUNDING_PREFIX)
    texts = {"report": NODULE_REPORT, grounding: "none", f"{analyze.DETECTION_PREFIX}nodule@{key}": "none"}
    result = analyze.assemble(req, respond(req, texts), sources=[slices[0]])
    assert result.findings == []
    assert [s.status for s in result.report.sentences] == ["text_only", "statement", "text_only"]
    assert result.consistency is not None and result.consistency.flagged


def test_a_follow_up_that_names_no_slice_of_the_request_is_refused(slices: list[Dataset]) -> None:
    req = local(slices)
    texts = {"report": NODULE_REPORT, **{tid: "none" for tid in grounding_ids(req)},
             f"{analyze.DETECTION_PREFIX}nodule@9.9.9": "<p>nodule</p> {<10><10><30><30>}"}
    with pytest.raises(analyze.AnalysisError, match="names no grounding slice"):
        analyze.assemble(req, respond(req, texts))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder: Path = tiny_model_folder(tmp_path_factory.mktemp("tiny-model"))
    inference.clear_cache()
    return inference.get_model(str(folder), "cpu")


def test_the_runner_answers_exactly_the_follow_ups_of_its_first_answers(loaded: LoadedModel) -> None:
    """On a real (random-weight) model: the response holds the request's tasks, then the follow-ups the first
    answers call for, and nothing else; without follow-ups only the request's tasks."""
    reqs = [request(f"1.2.3.{n}", [n, n + 1], tokens=40) for n in range(1, 4)]
    plain = analyze.run_batch(loaded, reqs, follow_up=False)
    grounded = analyze.run_batch(loaded, reqs)
    for req, first, second in zip(reqs, plain, grounded, strict=True):
        ids = [task.task_id for task in req.tasks]
        assert [o.task_id for o in first.outputs] == ids
        expected = [t.task_id for t in analyze.follow_up_tasks(req, first.texts())]
        assert [o.task_id for o in second.outputs] == ids + expected
        assert {k: v for k, v in second.texts().items() if k in ids} == first.texts()
