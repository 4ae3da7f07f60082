"""The grounded draft under review (worklist/grounding.py): links kept through edits, the decision rule, the
signed structure, and the sentence decisions in the database."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from worklist_helpers import (  # noqa: F401 - fixture
    THREE_NODULES_CT,
    Client,
    database_url_fixture,
    settings_for,
    write_draft,
)

from core.result import AnalysisResult, Finding
from worklist import auth
from worklist.app import WorklistApp
from worklist.bridge import Bridge
from worklist.grounding import ground_draft, replace_sentence, sentence_key, sentence_spans
from worklist.server import RunningServer
from worklist.signing import SignError, final_result
from worklist.storage import Decision, Store, StudyState

NOW = datetime(2024, 5, 2, 9, 30, tzinfo=UTC)
PNEUMOTHORAX = Finding(label="pneumothorax", sop_instance_uid="", box=(10.0, 10.0, 40.0, 40.0), laterality="left")


@pytest.fixture
def draft(tmp_path: Path) -> AnalysisResult:
    """A CT draft of three nodules (left; right, right), a text-only "Mild cardiomegaly." and a box-only left
    pneumothorax (finding 4), linked as the analysis links it."""
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'w.sqlite'}")
    return write_draft(settings, THREE_NODULES_CT, modality="CT", grounded=True, extra_text="Mild cardiomegaly.",
                       extra_boxes=(PNEUMOTHORAX,)).result


def _ground(draft: AnalysisResult, findings: str | None = None, impression: str | None = None, **kwargs):
    return ground_draft(draft.report, draft.findings, draft.report.findings if findings is None else findings,
                        draft.report.impression if impression is None else impression, **kwargs)


def test_the_unchanged_draft_keeps_the_ai_links_and_flags(draft):
    grounded = _ground(draft)
    assert [(s.text, s.status, list(s.findings)) for s in grounded.sentences] == [
        (s.text, s.status, s.findings) for s in draft.report.sentences]
    assert all(s.origin == "ai" for s in grounded.sentences)
    assert [grounded.finding_status(i) for i in range(4)] == [f.status for f in draft.findings] == [
        "grounded", "grounded", "grounded", "box_only"]
    assert grounded.consistency == draft.consistency
    assert [s.text for s in grounded.undecided] == ["Mild cardiomegaly."]


def test_rejecting_the_only_box_of_a_sentence_makes_it_text_only_and_undecided(draft):
    grounded = _ground(draft, rejected={0})
    first = grounded.sentences[0]
    assert first.text.startswith("Solid nodule in the left upper lobe")
    assert (first.status, first.findings, first.needs_decision) == ("text_only", (), True)
    impression = next(s for s in grounded.sentences if s.text.startswith("Three left and right"))
    assert impression.status == "grounded" and impression.findings == (1, 2)  # still shown by the right nodules
    assert grounded.finding_status(0) is None and 0 not in grounded.finding_sentences
    assert (grounded.consistency.text_only, grounded.consistency.box_only) == (2, 1)
    all_rejected = _ground(draft, rejected={0, 1, 2})
    assert [s.describe() for s in all_rejected.undecided][-2:] == [
        "FINDINGS sentence 6 ('Mild cardiomegaly.')",
        "IMPRESSION sentence 1 ('Three left and right pulmonary nodules, the largest 17 mm.')"]


def test_removing_sentences_unlinks_their_boxes(draft):
    findings = draft.report.findings
    without_left = replace_sentence(findings, 0, "")
    grounded = _ground(draft, findings=without_left)
    assert grounded.finding_status(0) == "grounded"  # the impression still states the left nodule
    grounded = _ground(draft, findings=without_left, impression="Recommend follow-up per Fleischner guidelines.")
    assert grounded.finding_status(0) == "box_only" and grounded.finding_sentences[0] == []
    assert grounded.finding_status(1) == "grounded"


def test_a_sentence_the_radiologist_wrote_is_linked_by_the_same_rule_and_needs_no_decision(draft):
    number = next(s.index for s in draft_sentences(draft) if s.text == "Mild cardiomegaly.")
    edited = replace_sentence(draft.report.findings, number, "Small left apical pneumothorax.")
    grounded = _ground(draft, findings=edited)
    sentence = grounded.sentences[number]
    assert (sentence.origin, sentence.status, sentence.findings) == ("radiologist", "grounded", (3,))
    assert grounded.finding_status(3) == "grounded" and not grounded.undecided
    typed = _ground(draft, findings=edited + " Mild cardiomegaly is new.")
    assert typed.sentences[number + 1].status == "text_only" and not typed.sentences[number + 1].needs_decision
    relabelled = _ground(draft, findings=edited, labels={3: "pleural effusion"})
    assert relabelled.sentences[number].status == "text_only"  # linked by the radiologist's label


def test_accepting_a_statement_decides_that_wording_only(draft):
    key = sentence_key("findings", "Mild  cardiomegaly.")
    assert not _ground(draft, accepted={key}).undecided
    reworded = draft.report.findings.replace("Mild cardiomegaly.", "Mild cardiomegaly, unchanged.")
    assert _ground(draft, findings=reworded, accepted={key}).undecided == []  # the radiologist's wording
    assert [s.text for s in _ground(draft, accepted={("impression", "Mild cardiomegaly.")}).undecided] == [
        "Mild cardiomegaly."]


def draft_sentences(draft: AnalysisResult):
    return _ground(draft).sentences


def test_sentence_spans_and_replacement_keep_the_rest_of_the_text():
    text = "First one.  Second 0.5 mm.\nThird!"
    assert [text[a:b] for a, b in sentence_spans(text)] == ["First one.", "Second 0.5 mm.", "Third!"]
    assert replace_sentence(text, 1, "Changed.") == "First one.  Changed.\nThird!"
    assert replace_sentence(text, 0, "") == "Second 0.5 mm.\nThird!"
    assert replace_sentence(text, 2, "") == "First one.  Second 0.5 mm."
    with pytest.raises(IndexError, match="sentence 4 does not exist: the text has 3"):
        replace_sentence(text, 3, "x")


def _study(store: Store, entry: int):
    return store.get_study(entry)


@pytest.fixture
def registered(tmp_path, database_url):
    settings = settings_for(tmp_path, database_url)
    store = Store.from_settings(settings)
    disk = write_draft(settings, THREE_NODULES_CT, modality="CT", grounded=True, extra_text="Mild cardiomegaly.",
                       extra_boxes=(PNEUMOTHORAX,))
    entry = Bridge(settings, store).register_draft(disk.manifest_path, disk.result_path)
    yield store, entry, disk.result
    store.close()


def test_the_signed_result_carries_the_reviewed_structure(registered):
    store, entry, draft = registered
    reviews = {0: (Decision.REJECTED, "nodule"), 1: (Decision.ACCEPTED, "nodule"), 2: (Decision.ACCEPTED, "nodule"),
               3: (Decision.ACCEPTED, "pneumothorax")}
    with pytest.raises(SignError, match=r"2 AI statement\(s\) without image evidence still need a decision: "
                                        r"FINDINGS sentence 1 \('Solid nodule in the left upper lobe.*'\); "
                                        r"FINDINGS sentence 6 \('Mild cardiomegaly.'\): accept each"):
        final_result(draft, _study(store, entry), reviews)
    store.set_sentence_review(entry, "findings", "Mild cardiomegaly.", Decision.ACCEPTED, username="curie", now=NOW)
    store.save_draft_text(entry, replace_sentence(draft.report.findings, 0, ""), draft.report.impression, NOW)
    final = final_result(draft, _study(store, entry), reviews, store.sentence_reviews(entry))
    assert [f.label for f in final.findings] == ["nodule", "nodule", "pneumothorax"]
    assert [(s.text, s.status, s.findings) for s in final.report.sentences if s.polarity == "positive"] == [
        ("A 16 mm solid nodule is present in the right upper lobe.", "grounded", [0, 1]),
        ("Solid nodule in the right upper lobe measuring 16 mm.", "grounded", [0, 1]),
        ("Mild cardiomegaly.", "text_only", []),
        ("Three left and right pulmonary nodules, the largest 17 mm.", "grounded", [0, 1])]
    assert [(f.status, f.sentences) for f in final.findings] == [("grounded", [0, 1, 5]), ("grounded", [0, 1, 5]),
                                                                 ("box_only", [])]
    assert (final.consistency.grounded, final.consistency.text_only, final.consistency.box_only) == (3, 1, 1)
    assert final.status == "final" and AnalysisResult.model_validate_json(final.model_dump_json()) == final


def test_a_draft_written_before_grounding_is_signed_as_before(tmp_path):
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'w.sqlite'}")
    store = Store.from_settings(settings)
    try:
        disk = write_draft(settings)
        entry = Bridge(settings, store).register_draft(disk.manifest_path, disk.result_path)
        reviews = {i: (Decision.ACCEPTED, f.label) for i, f in enumerate(disk.result.findings)}
        final = final_result(disk.result, _study(store, entry), reviews, {})
        assert final.report.sentences == [] and final.consistency is None
        assert all(f.status is None and f.sentences == [] for f in final.findings)
    finally:
        store.close()


def test_sentence_decisions_are_stored_by_wording_and_only_while_editable(registered):
    store, entry, _ = registered
    store.set_sentence_review(entry, "findings", " Mild\ncardiomegaly. ", Decision.ACCEPTED, username="curie", now=NOW)
    assert store.sentence_reviews(entry) == {("findings", "Mild cardiomegaly."): Decision.ACCEPTED}
    store.set_sentence_review(entry, "findings", "Mild cardiomegaly.", Decision.PENDING, username="curie", now=NOW)
    assert store.sentence_reviews(entry) == {}
    store.set_state(entry, StudyState.SIGNED, NOW)
    with pytest.raises(PermissionError, match="is signed: sentences can be reviewed only in a draft"):
        store.set_sentence_review(entry, "findings", "Mild cardiomegaly.", Decision.ACCEPTED, username="curie",
                                  now=NOW)


@pytest.fixture
def grounded_web(tmp_path, database_url):
    settings = settings_for(tmp_path, database_url)
    store = Store.from_settings(settings)
    store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                   organization="Institut du Radium", now=datetime.now(UTC))
    disk = write_draft(settings, THREE_NODULES_CT, modality="CT", grounded=True, extra_text="Mild cardiomegaly.",
                       extra_boxes=(PNEUMOTHORAX,))
    entry = Bridge(settings, store).register_draft(disk.manifest_path, disk.result_path)
    with RunningServer(WorklistApp(Bridge(settings, store))) as server:
        client = Client(server)
        client.login()
        yield client, store, entry
    store.close()


def _document(client: Client, entry: int) -> dict:
    return json.loads(client.request("GET", f"/api/studies/{entry}")[1])


def test_signing_over_http_waits_for_a_decision_on_each_statement_without_image_evidence(grounded_web):
    client, store, entry = grounded_web
    (row,) = json.loads(client.request("GET", "/api/studies")[1])["studies"]
    assert row["ai_disagreement"] == {"text_only": 1, "box_only": 1}  # the worklist row says so too
    study = _document(client, entry)
    assert study["grounded"] and study["consistency"] == {"grounded": 4, "text_only": 1, "box_only": 1,
                                                          "flagged": True, "undecided": 1}
    assert [f["status"] for f in study["findings"]] == ["grounded", "grounded", "grounded", "box_only"]
    assert study["findings"][0]["sentences"] == [0, 6]
    cardiomegaly = next(s for s in study["sentences"] if s["status"] == "text_only")
    assert (cardiomegaly["index"], cardiomegaly["text"], cardiomegaly["needs_decision"]) == (
        5, "Mild cardiomegaly.", True)
    for index in range(4):
        assert client.post_json(f"/api/studies/{entry}/findings/{index}", {"decision": "accepted"})[0] == 200
    status, body = client.post_json(f"/api/studies/{entry}/sign", {})
    assert status == 422 and body["error"] == (
        "1 AI statement(s) without image evidence still need a decision: FINDINGS sentence 6 ('Mild cardiomegaly.')"
        ": accept each as stated, edit it or remove it before signing")
    assert store.get_study(entry).state is StudyState.IN_REVIEW
    path = f"/api/studies/{entry}/sentences/5"
    assert client.post_json(path, {"action": "accept", "expect": "Mild cardiomegaly, changed."})[0] == 409
    assert client.post_json(path, {"action": "shrug", "expect": "Mild cardiomegaly."})[0] == 400
    assert client.post_json(f"/api/studies/{entry}/sentences/0", {"action": "accept", "expect": study[
        "sentences"][0]["text"]})[0] == 422  # grounded: nothing to decide
    assert client.post_json(f"/api/studies/{entry}/sentences/99", {"action": "accept", "expect": "x"})[0] == 404
    assert client.post_json(path, {"action": "accept", "expect": "Mild cardiomegaly."}) == (
        200, {"index": 5, "action": "accept"})
    assert _document(client, entry)["consistency"]["undecided"] == 0
    status, body = client.post_json(f"/api/studies/{entry}/sign", {})
    assert (status, body["version"]) == (200, 1)
    version = store.versions(entry)[0]
    signed = AnalysisResult.read(Path(version.output_dir) / "result_final.json")
    assert [s.text for s in signed.report.sentences if s.status == "text_only"] == ["Mild cardiomegaly."]
    assert signed.consistency.box_only == 1 and signed.findings[3].status == "box_only"
    assert "sentence-accepted" in [e.action for e in store.audit_entries(entry)]


def test_rejecting_a_box_or_editing_and_removing_sentences_over_http(grounded_web):
    client, store, entry = grounded_web
    assert client.post_json(f"/api/studies/{entry}/findings/0", {"decision": "rejected"})[0] == 200
    study = _document(client, entry)
    first = study["sentences"][0]
    assert (first["status"], first["needs_decision"]) == ("text_only", True)  # its only box was rejected
    assert study["findings"][0]["status"] is None and study["consistency"]["undecided"] == 2
    status, _ = client.post_json(f"/api/studies/{entry}/sentences/0", {"action": "remove", "expect": first["text"]})
    assert status == 200 and not store.get_study(entry).draft_findings.startswith("Solid nodule in the left")
    study = _document(client, entry)
    cardiomegaly = next(s for s in study["sentences"] if s["text"] == "Mild cardiomegaly.")
    assert client.post_json(f"/api/studies/{entry}/sentences/{cardiomegaly['index']}",
                            {"action": "edit", "text": "", "expect": "Mild cardiomegaly."})[0] == 400
    status, _ = client.post_json(f"/api/studies/{entry}/sentences/{cardiomegaly['index']}",
                                 {"action": "edit", "text": "Small left  pneumothorax.",
                                  "expect": "Mild cardiomegaly."})
    assert status == 200
    study = _document(client, entry)
    assert store.get_study(entry).draft_findings.endswith("unremarkable. Small left pneumothorax.")
    edited = study["sentences"][cardiomegaly["index"]]
    assert (edited["origin"], edited["status"], edited["findings"]) == ("radiologist", "grounded", [3])
    assert study["findings"][3]["status"] == "grounded"
    assert study["consistency"] == {"grounded": 4, "text_only": 0, "box_only": 0, "flagged": False,
                                    "undecided": 0}
    recommendation = study["sentences"][-1]
    assert (recommendation["section"], recommendation["position"]) == ("impression", 1)
    assert client.post_json(f"/api/studies/{entry}/sentences/{recommendation['index']}",
                            {"action": "remove", "expect": recommendation["text"]})[0] == 200
    assert store.get_study(entry).draft_impression == "Three left and right pulmonary nodules, the largest 17 mm."
    actions = [e.action for e in store.audit_entries(entry)]
    assert "sentence-removed" in actions and "sentence-edited" in actions


def test_a_draft_written_before_grounding_has_no_sentences_to_review(web_old):
    client, entry = web_old
    assert json.loads(client.request("GET", "/api/studies")[1])["studies"][0]["ai_disagreement"] is None
    study = _document(client, entry)
    assert (study["grounded"], study["sentences"], study["consistency"]) == (False, [], None)
    assert [f["status"] for f in study["findings"]] == [None, None, None]
    assert client.post_json(f"/api/studies/{entry}/sentences/0", {"action": "accept", "expect": "x"})[0] == 404


@pytest.fixture
def web_old(tmp_path):
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'w.sqlite'}")
    store = Store.from_settings(settings)
    store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                   organization="Institut du Radium", now=datetime.now(UTC))
    disk = write_draft(settings)
    entry = Bridge(settings, store).register_draft(disk.manifest_path, disk.result_path)
    with RunningServer(WorklistApp(Bridge(settings, store))) as server:
        client = Client(server)
        client.login()
        yield client, entry
    store.close()
