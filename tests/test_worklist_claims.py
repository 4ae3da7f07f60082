"""Claims over real HTTP on loopback: a study in review belongs to the radiologist reading it; another one sees
who, cannot edit, review or sign it, and takes it over only explicitly (audited)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from worklist_helpers import Client, database_url_fixture, settings_for, write_draft  # noqa: F401 - fixture

from worklist import auth
from worklist.app import WorklistApp
from worklist.bridge import Bridge
from worklist.server import RunningServer
from worklist.signing import SignConflictError
from worklist.storage import Decision, Store


@pytest.fixture
def two_readers(tmp_path, database_url):
    settings = settings_for(tmp_path, database_url)
    store = Store.from_settings(settings)
    for name, role, password in (("curie", "radiologist", "radium-226"), ("pierre", "radiologist", "polonium-84"),
                                 ("root", "admin", "admin-pass")):
        store.add_user(name, role, auth.hash_password(password), full_name=f"{name}^X", organization="IR",
                       now=datetime.now(UTC))
    bridge = Bridge(settings, store)
    draft = write_draft(settings, accession="ACC-9")
    entry = bridge.register_draft(draft.manifest_path, draft.result_path)
    with RunningServer(WorklistApp(bridge)) as server:
        curie, pierre, root = Client(server), Client(server), Client(server)
        assert curie.login()[0].status == 303
        assert pierre.login("pierre", "polonium-84")[0].status == 303
        assert root.login("root", "admin-pass")[0].status == 303
        yield curie, pierre, root, store, bridge, entry
    store.close()


def study(client: Client, entry: int) -> dict:
    return json.loads(client.request("GET", f"/api/studies/{entry}")[1])


def test_a_study_in_review_is_its_readers_until_another_takes_it_over(two_readers):
    """Before: a second radiologist could sign a study the first was reviewing, replacing their text."""
    curie, pierre, root, store, _, entry = two_readers
    assert curie.request("GET", f"/studies/{entry}")[0].status == 200  # opening the draft claims it
    assert curie.post_json(f"/api/studies/{entry}/report", {"findings": "Curie's text.", "impression": "Hers."})[0] \
        == 200
    listing = json.loads(pierre.request("GET", "/api/studies")[1])["studies"]
    assert [(s["state"], s["claimed_by"]) for s in listing] == [("in review", "curie")]
    pierre.request("GET", f"/studies/{entry}")  # looking does not take it
    seen = study(pierre, entry)
    assert (seen["claimed_by"], seen["editable"], seen["can_sign"], seen["can_take_over"]) == (
        "curie", False, False, True)
    assert (study(curie, entry)["editable"], study(curie, entry)["can_take_over"]) == (True, False)
    refused = f"worklist entry {entry} is in review by curie: take it over to edit or sign it"
    for path, body in (("report", {"findings": "Pierre's.", "impression": "His."}),
                       ("findings/0", {"decision": "rejected"}),
                       ("correct", {"findings": "x", "impression": "y", "request": "remove nodule"}),
                       ("sign", {"findings": "Pierre's.", "impression": "His."})):
        assert pierre.post_json(f"/api/studies/{entry}/{path}", body) == (409, {"error": refused}), path
    kept = store.get_study(entry)
    assert (kept.state.value, kept.draft_findings, store.finding_reviews(entry)) == ("in review", "Curie's text.", {})

    assert pierre.post_json(f"/api/studies/{entry}/take-over", {}, csrf=False)[0] == 403  # CSRF-checked
    assert root.post_json(f"/api/studies/{entry}/take-over", {}) == (
        403, {"error": "role 'admin' cannot take over reports"})
    assert pierre.post_json(f"/api/studies/{entry}/take-over", {}) == (
        200, {"state": "in review", "claimed_by": "pierre", "previous": "curie"})
    assert [(e.username, e.detail) for e in store.audit_entries(entry) if e.action == "take-over"] == [
        ("pierre", "from curie")]
    assert [(e.username, e.action) for e in store.audit_entries(entry) if e.action == "claim"] == [
        ("curie", "claim")]
    status, body = curie.post_json(f"/api/studies/{entry}/report", {"findings": "Curie again.", "impression": "x"})
    assert (status, body["error"]) == (409, f"worklist entry {entry} is in review by pierre: take it over to edit "
                                            "or sign it")
    assert study(curie, entry)["can_take_over"]
    for index in range(3):
        assert pierre.post_json(f"/api/studies/{entry}/findings/{index}", {"decision": "accepted"})[0] == 200
    status, body = pierre.post_json(f"/api/studies/{entry}/sign", {"findings": "Three.", "impression": "Three."})
    assert (status, body["signed_by"]) == (200, "pierre")
    assert study(curie, entry)["claimed_by"] is None  # signed: nobody's any more


def test_an_amendment_is_claimed_by_the_radiologist_who_starts_it(two_readers):
    curie, pierre, _, store, _, entry = two_readers
    for index in range(3):
        assert curie.post_json(f"/api/studies/{entry}/findings/{index}", {"decision": "accepted"})[0] == 200
    assert curie.post_json(f"/api/studies/{entry}/sign", {"findings": "A.", "impression": "B."})[0] == 200
    assert pierre.post_json(f"/api/studies/{entry}/amend", {})[0] == 200
    assert store.get_study(entry).claimant == "pierre"
    status, body = curie.post_json(f"/api/studies/{entry}/sign", {"findings": "C.", "impression": "D."})
    assert status == 409 and "in review by pierre" in body["error"]


def test_signing_checks_the_claim_in_the_same_statement_that_claims_the_signature(two_readers):
    """The web checks the claim first; sign_study checks it again when it moves the entry to signed, so a
    take-over between the two still wins."""
    _, _, _, store, bridge, entry = two_readers
    assert store.claim(entry, "curie", datetime.now(UTC)) is None
    for index in range(3):
        store.set_finding_review(entry, index, Decision.ACCEPTED, label="nodule", username="curie",
                                 now=datetime.now(UTC))
    with pytest.raises(SignConflictError, match=f"worklist entry {entry} is in review by curie: take it over"):
        bridge.sign(entry, store.get_user("pierre"))
    assert store.get_study(entry).state.value == "in review" and store.versions(entry) == []

