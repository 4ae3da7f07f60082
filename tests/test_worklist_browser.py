"""The worklist in a real headless Chromium (Playwright): log in, watch a new draft arrive, review, edit, sign.

Then the final SR and ORU written through the bridge are checked, and screenshots of both pages are saved to
docs/screenshots/ for the README.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import hl7
import pydicom
import pytest
from playwright.sync_api import expect, sync_playwright
from worklist_helpers import ONE_FINDING_CR, settings_for, write_draft

from worklist import auth
from worklist.app import WorklistApp
from worklist.bridge import Bridge
from worklist.server import RunningServer
from worklist.signing import SignedReport
from worklist.storage import Store

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


def _texts(dataset):
    found = []
    for item in dataset.get("ContentSequence", []):
        if "TextValue" in item:
            found.append(str(item.TextValue))
        found += _texts(item)
    return found


@pytest.fixture
def served(tmp_path):
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'worklist.sqlite'}")
    store = Store.from_settings(settings)
    store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                   organization="Institut du Radium", now=datetime.now(UTC))
    bridge = Bridge(settings, store)
    with RunningServer(WorklistApp(bridge, refresh_ms=300)) as server:
        yield settings, store, bridge, server
    store.close()


def test_review_edit_and_sign_in_chromium(served):
    settings, store, bridge, server = served
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
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "worklist.png"))

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
            page.screenshot(path=str(SCREENSHOTS / "study.png"))

            page.click("#sign")
            expect(page.locator("#sign-status")).to_have_text("Signed version 1 (F)")
            expect(page.locator("#state-badge")).to_have_text("signed")
            expect(page.locator("#versions li")).to_have_count(1)
            expect(page.locator("#report-findings")).to_be_disabled()
            expect(page.locator("#prelim-badge")).to_be_hidden()
        finally:
            browser.close()

    assert len(signed) == 1
    report = signed[0]
    sr = pydicom.dcmread(next(e.path for e in report.files if e.kind == "sr"))
    assert sr.VerificationFlag == "VERIFIED" and sr.PreliminaryFlag == "FINAL"
    assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "Curie^Marie"
    assert "Lung consolidation" not in repr(sr)
    narrative = pydicom.dcmread(next(e.path for e in report.files if e.kind == "narrative"))
    assert any("Edited by the radiologist." in t for t in _texts(narrative))
    message = hl7.parse(report.hl7_path.read_bytes().decode("utf-8"))
    assert str(message.segment("OBR")[25]) == "F"
    assert all(str(s[11]) == "F" for s in message.segments("OBX"))
    assert not any("onsolidation" in str(s[5]) for s in message.segments("OBX"))
    actions = [e.action for e in store.audit_entries(entry)]
    for action in ("view", "finding-rejected", "finding-accepted", "correct", "edit-report", "sign"):
        assert action in actions
