"""The worklist in a real headless Chromium (Playwright): log in, watch a new draft arrive, review, edit, sign.

The worklist runs as ``raddraft serve`` runs it (worklist/service.py) beside a real Celery io worker on the
SQLite broker (in this process); the signature's deliveries go through that queue to a real Orthanc (the final
SR is read back from it) and a real MLLP listener (the ORU with OBR-25 = F). Screenshots of both pages are taken
on every run (into the test's folder); with RADDRAFT_UPDATE_SCREENSHOTS=1 they replace docs/screenshots/ of the
README.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

import hl7
import pytest
from playwright.sync_api import expect, sync_playwright
from worklist_helpers import ONE_FINDING_CR, THREE_NODULES_CT, orthanc_instance, settings_for, write_draft

import worklist.tasks  # noqa: F401 - registers the signed-delivery tasks with the worker
from core.result import AnalysisResult, Finding
from core.states import DeliveryState
from model.embedded import load_model
from peers import wait_for
from peers.mllp import MLLPListener
from workers.celery_app import IO_QUEUE, configure
from workers.inprocess import InProcessWorker
from worklist import auth
from worklist.answerer import MiniGPTAnswerer
from worklist.app import WorklistApp
from worklist.bridge import Bridge
from worklist.delivery import signed_deliveries
from worklist.server import RunningServer
from worklist.service import WorklistService
from worklist.signing import SignedReport
from worklist.storage import Store

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
README_SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


@pytest.fixture
def screenshots(tmp_path):
    """Where the page screenshots go: docs/screenshots/ only when asked (a test run leaves the tree clean)."""
    folder = README_SCREENSHOTS if os.environ.get("RADDRAFT_UPDATE_SCREENSHOTS") == "1" else tmp_path / "shots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _texts(dataset):
    found = []
    for item in dataset.get("ContentSequence", []):
        if "TextValue" in item:
            found.append(str(item.TextValue))
        found += _texts(item)
    return found


@pytest.fixture
def served(tmp_path, orthanc):
    with MLLPListener() as listener:
        settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'worklist.sqlite'}", http_port=0,
                                dicom_destinations=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                                hl7_destinations=f"127.0.0.1:{listener.port}",
                                broker_url=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}")  # workers in-process
        worker = InProcessWorker(configure(settings), [IO_QUEUE], concurrency=1)
        worker.start()
        try:
            answerer = MiniGPTAnswerer(load_model("embedded").model)  # the shipped model answers the Ask box
            with WorklistService(settings, answerer, refresh_ms=300) as service:
                service.store.add_user("curie", "radiologist", auth.hash_password("radium-226"),
                                       full_name="Curie^Marie", organization="Institut du Radium",
                                       now=datetime.now(UTC))
                yield settings, service, listener
        finally:
            worker.stop()


def test_review_edit_and_sign_in_chromium(served, orthanc, screenshots):
    settings, service, listener = served
    store, bridge, server = service.store, service.bridge, service
    signed: list[SignedReport] = []
    bridge.on_sign(signed.append)
    draft = write_draft(settings, accession="ACC-1001")
    entry = bridge.register_draft(draft.manifest_path, draft.result_path)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(server.url + "/")
            expect(page).to_have_url(server.url + "/login")
            page.fill("input[name=username]", "curie")
            page.fill("input[name=password]", "wrong-password")
            page.click("button[type=submit]")
            expect(page.get_by_role("alert")).to_have_text("Wrong user name or password.")
            page.fill("input[name=username]", "curie")
            page.fill("input[name=password]", "radium-226")
            page.click("button[type=submit]")
            expect(page).to_have_url(server.url + "/")
            rows = page.locator("#worklist tbody tr")
            expect(rows).to_have_count(1)

            second = write_draft(settings, ONE_FINDING_CR, accession="ACC-1002")  # arrives while the page is open
            bridge.register_draft(second.manifest_path, second.result_path, priority="stat")
            expect(rows).to_have_count(2)  # auto-refresh
            expect(rows.first).to_contain_text("ACC-1002")  # stat sorts first
            page.click("th[data-sort=accession]")
            expect(rows.first).to_contain_text("ACC-1001")
            page.fill("#f-accession", "1002")  # the filter controls narrow the list ...
            expect(rows).to_have_count(1)
            expect(rows.first).to_contain_text("ACC-1002")
            page.fill("#f-accession", "")
            page.select_option("#f-priority", "stat")
            expect(rows).to_have_count(1)
            expect(rows.first).to_contain_text("ACC-1002")
            page.select_option("#f-priority", "")
            page.fill("#f-modality", "MR")
            expect(rows).to_have_count(0)
            page.fill("#f-modality", "")
            expect(rows).to_have_count(2)  # ... and clearing them brings every draft back
            page.screenshot(path=str(screenshots / "worklist.png"))

            rows.filter(has_text="ACC-1001").click()
            expect(page).to_have_url(f"{server.url}/studies/{entry}")
            findings = page.locator("#findings li")
            expect(findings).to_have_count(3)
            expect(page.locator("#overlay g.box")).to_have_count(3)
            expect(page.locator("#prelim-badge")).to_be_visible()
            page.uncheck("#toggle-boxes")
            expect(page.locator("#overlay g.box")).to_have_count(0)
            page.check("#toggle-boxes")
            before = page.locator("#zoom-level").inner_text()
            page.click("#zoom-in")
            expect(page.locator("#zoom-level")).not_to_have_text(before)
            page.click("#zoom-fit")

            page.select_option("#ask-kind", "vqa")  # a question to the model about the image on screen
            page.fill("#ask-text", "is there a pleural effusion?")
            page.click("#ask-form button")
            expect(page.locator("#ask-answer")).to_contain_text("Model ([vqa] is there a pleural effusion?): ",
                                                                 timeout=60_000)
            assert page.locator("#ask-answer").inner_text().split("): ", 1)[1].strip()

            findings.nth(1).get_by_role("button", name="Reject").click()
            expect(findings.nth(1)).to_have_class("rejected")
            findings.nth(0).get_by_role("button", name="Accept").click()
            expect(findings.nth(0)).to_have_class("accepted")
            findings.nth(2).get_by_role("textbox").fill("pulmonary nodule")
            findings.nth(2).get_by_role("button", name="Set label").click()
            expect(findings.nth(2)).to_have_class("accepted")
            expect(findings.nth(2).locator(".label")).to_have_text("pulmonary nodule")
            expect(page.locator("#overlay g.box.rejected")).to_have_count(1)

            page.fill("#correct-text", "Remove the consolidation.")
            page.click("#correct-form button")
            expect(page.locator("#correct-status")).to_have_text("Corrected: removed consolidation")
            assert "consistent with consolidation" not in page.input_value("#report-findings")
            edited = page.input_value("#report-findings") + " Edited by the radiologist."
            page.fill("#report-findings", edited)
            page.click("#save-report")
            expect(page.locator("#report-status")).to_contain_text("Draft saved")
            page.screenshot(path=str(screenshots / "study.png"))

            page.click("#sign")
            expect(page.locator("#sign-status")).to_have_text("Signed version 1 (F)")
            expect(page.locator("#state-badge")).to_have_text("signed")
            expect(page.locator("#versions li")).to_have_count(1)
            expect(page.locator("#versions li .deliveries")).to_contain_text(
                f"SR/GSPS to {orthanc.aet}@127.0.0.1:{orthanc.dicom_port}: ")
            expect(page.locator("#versions li .deliveries")).to_contain_text(f"ORU to 127.0.0.1:{listener.port}: ")
            expect(page.locator("#report-findings")).to_be_disabled()
            expect(page.locator("#prelim-badge")).to_be_hidden()
        finally:
            browser.close()

    assert len(signed) == 1
    report = signed[0]
    # the io worker took both deliveries off the queue: the final SR as Orthanc stored it ...
    sr_uid = next(e.sop_instance_uid for e in report.files if e.kind == "sr")
    sr = wait_for(lambda: orthanc_instance(orthanc, sr_uid), timeout=60, interval=0.25, what="final SR in Orthanc")
    assert sr.VerificationFlag == "VERIFIED" and sr.PreliminaryFlag == "FINAL"
    assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "Curie^Marie"
    assert sr.VerifyingObserverSequence[0].VerifyingOrganization == "Institut du Radium"
    assert "Lung consolidation" not in repr(sr)
    narrative_uid = next(e.sop_instance_uid for e in report.files if e.kind == "narrative")
    narrative = wait_for(lambda: orthanc_instance(orthanc, narrative_uid), timeout=30, what="narrative in Orthanc")
    assert any("Edited by the radiologist." in t for t in _texts(narrative))
    gsps = [e.sop_instance_uid for e in report.files if e.kind == "gsps"]
    assert gsps
    # sent after the SR and the narrative on the same association: Orthanc may index it a moment later
    wait_for(lambda: set(gsps) <= orthanc.sop_instance_uids(), timeout=30, what="final GSPS in Orthanc")
    # ... and the ORU as the MLLP listener received it
    (message,) = listener.wait_for_messages(1, timeout=60)
    assert str(message.segment("OBR")[25]) == "F"
    assert all(str(s[11]) == "F" for s in message.segments("OBX"))
    assert not any("onsolidation" in str(s[5]) for s in message.segments("OBX"))
    assert str(message) == str(hl7.parse(report.hl7_path.read_bytes().decode("utf-8")))  # the bytes signing wrote
    # the rows in the state store (what the study page shows); the audit lines from worklist.delivery_outcome
    wait_for(lambda: [r.state for r in signed_deliveries(settings, report.study_uid, report.episode_id)[1]]
             == [DeliveryState.DONE] * 2, timeout=30, what="both deliveries done")
    wait_for(lambda: {"delivered-dicom", "delivered-hl7"} <= {e.action for e in store.audit_entries(entry)},
             timeout=30, what="both deliveries audited")
    actions = [e.action for e in store.audit_entries(entry)]
    for action in ("view", "finding-rejected", "finding-accepted", "correct", "edit-report", "sign",
                   "delivered-dicom", "delivered-hl7"):
        assert action in actions


# a statement no box shows, written as HTML: the page must show it as text and run nothing
HOSTILE_STATEMENT = 'Mild cardiomegaly <img src=x onerror="window.pwned=1">.'


@pytest.fixture
def grounded_served(tmp_path):
    """A worklist (no model, no destination) with a grounded CT draft: three nodules on two of four sections,
    a text-only statement and a box-only left pneumothorax on the first section."""
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'worklist.sqlite'}")
    store = Store.from_settings(settings)
    try:
        store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                       organization="Institut du Radium", now=datetime.now(UTC))
        bridge = Bridge(settings, store)
        draft = write_draft(settings, THREE_NODULES_CT, modality="CT", accession="ACC-CT", grounded=True,
                            extra_text=HOSTILE_STATEMENT,
                            extra_boxes=(Finding(label="pneumothorax", sop_instance_uid="", laterality="left",
                                                 box=(10.0, 10.0, 40.0, 40.0)),))
        entry = bridge.register_draft(draft.manifest_path, draft.result_path)
        with RunningServer(WorklistApp(bridge)) as server:
            yield server, store, entry
    finally:
        store.close()


def test_grounded_draft_sentences_boxes_and_decisions_in_chromium(grounded_served, screenshots):
    server, store, entry = grounded_served
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(server.url + "/login")
            page.fill("input[name=username]", "curie")
            page.fill("input[name=password]", "radium-226")
            page.click("button[type=submit]")
            expect(page).to_have_url(server.url + "/")
            expect(page.locator("#worklist tbody tr").get_by_test_id("ai-disagreement")).to_have_text(
                "AI text/boxes disagree")
            page.goto(f"{server.url}/studies/{entry}")
            sentences = page.locator("#sentences .sentence")
            expect(sentences).to_have_count(8)
            doc = page.request.get(f"{server.url}/api/studies/{entry}").json()
            image_of = [f["image"] for f in doc["findings"]]
            # the nodules on two sections, neither the first one shown
            assert image_of[0] == image_of[2] != image_of[1] == image_of[3] and 0 not in image_of
            banner = page.get_by_test_id("grounding-banner")
            expect(banner).to_have_text("AI text and boxes disagree: 1 statement(s) without image evidence, 1 box(es) "
                                        "not in the text · 1 statement(s) to accept, edit or remove before signing")
            hostile = sentences.nth(5)
            expect(hostile).to_have_text(HOSTILE_STATEMENT)  # shown as text ...
            expect(hostile).to_have_class(re.compile(r"\btext_only\b"))
            assert page.evaluate("window.pwned") is None  # ... and nothing of it ran
            expect(page.locator("#sentences img")).to_have_count(0)
            expect(page.get_by_test_id("not-localized")).to_have_count(1)
            expect(page.locator("#sentences [data-testid=not-localized]")).to_have_text(["not localized by the AI"])
            expect(page.get_by_test_id("box-only")).to_have_text(["localized, not in the text"])
            expect(page.locator("#findings li").nth(3).get_by_test_id("box-only")).to_have_count(1)

            # a sentence shows its box, on its section
            expect(page.locator("#viewport")).to_have_attribute("data-image", "0")
            sentences.nth(0).click()
            expect(page.locator("#viewport")).to_have_attribute("data-image", str(image_of[0]))
            expect(page.locator('#overlay g.box[data-index="0"]')).to_have_class(re.compile(r"\bselected\b"))
            expect(page.locator('#overlay g.box[data-index="2"]')).not_to_have_class(re.compile(r"\bselected\b"))
            expect(sentences.nth(0)).to_have_class(re.compile(r"\bselected\b"))
            # a box shows its sentences: the right nodule is stated twice in FINDINGS and once in IMPRESSION
            page.locator('#overlay g.box[data-index="2"] rect').click()
            selected = page.locator("#sentences .sentence.selected")
            expect(selected).to_have_count(3)
            assert [int(i) for i in selected.evaluate_all("els => els.map(e => e.dataset.index)")] == [1, 2, 6]
            expect(page.locator('#overlay g.box[data-index="2"]')).to_have_class(re.compile(r"\bselected\b"))
            page.screenshot(path=str(screenshots / "study_grounded.png"), full_page=True)

            # rejecting the left nodule's only box leaves its sentence without image evidence: a decision more
            findings = page.locator("#findings li")
            findings.nth(0).get_by_role("button", name="Reject").click()
            decisions = page.get_by_test_id("sentence-decision")
            expect(decisions).to_have_count(2)
            expect(sentences.nth(0)).to_have_class(re.compile(r"\btext_only\b"))
            for index in (1, 2, 3):
                findings.nth(index).get_by_role("button", name="Accept").click()
                expect(findings.nth(index)).to_have_class(re.compile(r"\baccepted\b"))
            page.click("#sign")
            expect(page.locator("#sign-status")).to_contain_text(
                "Not signed: 2 AI statement(s) without image evidence still need a decision: FINDINGS sentence 1 ")
            decisions.nth(0).get_by_role("button", name="Remove").click()
            expect(decisions).to_have_count(1)
            expect(sentences).to_have_count(7)
            expect(page.locator("#report-findings")).not_to_have_value(re.compile("left upper lobe"))
            decisions.nth(0).get_by_role("button", name="Accept as stated").click()
            expect(decisions.nth(0)).to_contain_text("accepted as stated")
            expect(banner).not_to_contain_text("before signing")
            page.click("#sign")
            expect(page.locator("#sign-status")).to_have_text("Signed version 1 (F)")
            expect(page.locator("#state-badge")).to_have_text("signed")
            assert page.evaluate("window.pwned") is None
        finally:
            browser.close()

    signed = AnalysisResult.read(Path(store.versions(entry)[0].output_dir) / "result_final.json")
    assert [f.label for f in signed.findings] == ["nodule", "nodule", "pneumothorax"]
    assert [s.text for s in signed.report.sentences if s.status == "text_only"] == [HOSTILE_STATEMENT]
    assert not any("left upper lobe" in s.text for s in signed.report.sentences)
    assert (signed.consistency.grounded, signed.consistency.text_only, signed.consistency.box_only) == (3, 1, 1)
    actions = [e.action for e in store.audit_entries(entry)]
    assert "sentence-removed" in actions and "sentence-accepted" in actions
