"""The worklist over real HTTP on loopback: login, cookies, CSRF and origin checks, JSON API, PNG, audit."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from urllib.parse import urlencode

import pytest
from worklist_helpers import Client, database_url_fixture, settings_for, write_draft  # noqa: F401 - fixture

from core.http import respond
from worklist import auth
from worklist.app import WorklistApp
from worklist.bridge import Bridge
from worklist.server import RunningServer
from worklist.storage import Store


@pytest.fixture
def web(tmp_path, database_url):
    settings = settings_for(tmp_path, database_url)
    store = Store.from_settings(settings)
    store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                   organization="Institut du Radium", now=datetime.now(UTC))
    store.add_user("root", "admin", auth.hash_password("admin-pass"), full_name="Admin", organization="X",
                   now=datetime.now(UTC))
    bridge = Bridge(settings, store)
    draft = write_draft(settings, accession="ACC-7")
    entry = bridge.register_draft(draft.manifest_path, draft.result_path)
    with RunningServer(WorklistApp(bridge)) as server:
        yield Client(server), store, entry, draft
    store.close()


def test_login_sets_a_strict_http_only_session_and_wrong_passwords_are_audited(web):
    client, store, _, _ = web
    response, _, _ = client.request("GET", "/")
    assert response.status == 303 and response.headers["Location"] == "/login"
    response, data, _ = client.request("GET", "/api/studies")
    assert response.status == 401 and json.loads(data) == {"error": "sign in first"}
    response, data, _ = client.login(password="not-the-password")
    assert response.status == 401 and b"Wrong user name or password." in data
    response, _, cookies = client.login()
    assert response.status == 303
    session_cookie = next(c for c in cookies if c.startswith("rd_session="))
    assert "HttpOnly" in session_cookie and "SameSite=Strict" in session_cookie and "Secure" not in session_cookie
    response, _, _ = client.request("GET", "/")
    assert response.status == 200
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    actions = [(e.username, e.action) for e in store.audit_entries()]
    assert ("curie", "login-failed") in actions and ("curie", "login") in actions


def test_login_form_needs_its_csrf_cookie(web):
    client, _, _, _ = web
    client.request("GET", "/login")
    client.cookies.clear()
    form = urlencode({"csrf_token": "guess", "username": "curie", "password": "radium-226"})
    response, data, _ = client.request("POST", "/login", form, {"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status == 403 and b"login form expired" in data


def test_every_post_needs_the_session_csrf_token_and_same_origin(web):
    client, store, entry, _ = web
    client.login()
    path = f"/api/studies/{entry}/findings/0"
    assert client.post_json(path, {"decision": "rejected"}, csrf=False) == (
        403, {"error": "CSRF token missing or wrong: reload the page"})
    assert client.post_json(path, {"decision": "rejected"}, csrf=False,
                            headers={"X-CSRF-Token": "forged"})[0] == 403
    status, body = client.post_json(path, {"decision": "rejected"},
                                    headers={"Origin": "http://evil.example"})
    assert (status, body) == (403, {"error": "cross-origin POST refused"})
    assert store.finding_reviews(entry) == {}
    status, body = client.post_json(path, {"decision": "rejected"})
    assert status == 200 and body == {"index": 0, "decision": "rejected", "label": "nodule"}
    assert client.post_json(path, {"decision": "maybe"}) == (
        400, {"error": "decision must be 'accepted', 'rejected' or 'pending'"})
    assert client.post_json(f"/api/studies/{entry}/findings/9", {"decision": "accepted"})[0] == 404
    response, _, _ = client.request("POST", "/logout", urlencode({"csrf_token": client.csrf}),
                                    {"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status == 303
    response, _, _ = client.request("GET", "/api/studies")
    assert response.status == 401


def test_api_worklist_study_image_and_edits(web):
    client, store, entry, draft = web
    client.login()
    response, data, _ = client.request("GET", "/api/studies")
    listing = json.loads(data)
    assert [s["accession"] for s in listing["studies"]] == ["ACC-7"]
    assert "PHANTOM" not in data.decode() and draft.phantom.datasets[0].PatientID not in data.decode()
    assert (listing["offset"], listing["limit"], listing["has_more"]) == (0, 100, False)
    response, data, _ = client.request("GET", "/api/studies?limit=1&offset=1")
    assert json.loads(data)["studies"] == [] and json.loads(data)["limit"] == 1
    for query, message in (("limit=0", b"limit 0 must be a whole number from 1 to 500"),
                           ("limit=many", b"limit 'many' must be a whole number from 1 to 500"),
                           ("offset=-1", b"offset -1 must be a whole number from 0")):
        response, data, _ = client.request("GET", f"/api/studies?{query}")
        assert response.status == 400 and message in data, data
    response, data, _ = client.request("GET", "/api/studies?state=bogus")
    assert response.status == 400 and b"state 'bogus' must be one of" in data
    client.request("GET", f"/studies/{entry}")  # opening the page puts the draft in review
    response, data, _ = client.request("GET", f"/api/studies/{entry}")
    study = json.loads(data)
    assert study["state"] == "in review" and study["preliminary"] and study["can_sign"]
    assert [f["label"] for f in study["findings"]] == ["nodule", "consolidation", "nodule"]
    assert study["findings"][0]["box"] == list(draft.result.findings[0].box)
    image = study["images"][0]  # shown by the viewer through the worklist's WADO-RS (test_worklist_viewer_*.py)
    series = study["series"][image["series"]]["series_instance_uid"]
    frame = f"{study['wado_root']}/series/{series}/instances/{image['sop_instance_uid']}/frames/1"
    response, data, _ = client.request("GET", frame)
    assert response.status == 200 and response.headers["Content-Type"].startswith("multipart/related")
    assert len(data) > image["rows"] * image["columns"]
    response, _, _ = client.request("GET", frame.replace("/frames/1", "/frames/5"))
    assert response.status == 404

    status, body = client.post_json(f"/api/studies/{entry}/correct", {
        "findings": "The heart size is normal. There is no pleural effusion or pneumothorax.",
        "impression": "No active disease.", "request": "The patient also has a left pneumothorax."})
    assert status == 200 and body["edits"] == ["added left pneumothorax"]
    assert body["impression"] == "Left pneumothorax."
    assert store.get_study(entry).draft_impression == "Left pneumothorax."
    status, body = client.post_json(f"/api/studies/{entry}/correct", {"findings": "x", "impression": "y",
                                                                     "request": "make it shorter"})
    assert status == 422 and "known finding" in body["error"]
    assert client.post_json(f"/api/studies/{entry}/report", {"findings": 3})[0] == 400
    status, _ = client.post_json(f"/api/studies/{entry}/ask", {"image": 0, "kind": "vqa", "text": "effusion?"})
    assert status == 503  # no model connected
    response, _, _ = client.request("GET", "/audit")
    assert response.status == 403  # radiologists do not read the audit log
    actions = [e.action for e in store.audit_entries(entry)]
    assert "view" in actions and "correct" in actions


def test_admin_reads_the_audit_log_but_cannot_sign(web):
    client, _, entry, _ = web
    client.login("root", "admin-pass")
    response, data, _ = client.request("GET", "/audit")
    assert response.status == 200 and b"login" in data
    status, body = client.post_json(f"/api/studies/{entry}/sign", {})
    assert status == 403 and body == {"error": "role 'admin' cannot edit reports"}


def test_a_huge_id_or_a_deeply_nested_body_gets_a_4xx_not_a_500(web):
    """Before: a 10^20 study id overflowed the database's INTEGER and 100 000 nested arrays overflowed the JSON
    parser's stack, each an internal error (500)."""
    client, _, entry, _ = web
    client.login()
    huge = 10**20
    for path in (f"/api/studies/{huge}", f"/studies/{huge}", f"/studies/{entry}/images/{huge}.png"):
        response, data, _ = client.request("GET", path)
        assert response.status == 404, (path, data)
    assert client.post_json(f"/api/studies/{huge}/report", {"findings": "x"}) == (
        404, {"error": f"study id {huge} does not exist: ids are at most 2147483647"})
    assert client.post_json(f"/api/studies/{entry}/findings/{huge}", {"decision": "accepted"})[0] == 404
    assert client.post_json(f"/api/studies/{2**31}/report", {})[0] == 404
    deep = "[" * 100_000 + "]" * 100_000
    response, data, _ = client.request("POST", f"/api/studies/{entry}/report", deep,
                                       {"Content-Type": "application/json", "X-CSRF-Token": client.csrf})
    assert (response.status, json.loads(data)) == (
        400, {"error": "request body nests JSON arrays or objects too deeply"})
    assert client.post_json(f"/api/studies/{entry}/report", {"findings": "Still works.", "impression": "x"})[0] == 200


def test_sign_then_amend_over_http_makes_a_correction(web):
    client, store, entry, _ = web
    client.login()
    for index, decision in enumerate(["accepted", "rejected", "accepted"]):
        assert client.post_json(f"/api/studies/{entry}/findings/{index}", {"decision": decision})[0] == 200
    status, body = client.post_json(f"/api/studies/{entry}/sign",
                                    {"findings": "Two nodules.", "impression": "Nodules."})
    assert (status, body["version"], body["status"], body["signed_by"]) == (200, 1, "F", "curie")
    status, body = client.post_json(f"/api/studies/{entry}/report", {"findings": "changed", "impression": "x"})
    assert status == 409 and "amend it to make a new version" in body["error"]
    status, body = client.post_json(f"/api/studies/{entry}/amend", {})
    assert (status, body) == (200, {"state": "in review", "from_version": 1})
    assert client.post_json(f"/api/studies/{entry}/amend", {})[0] == 409  # already amending
    status, body = client.post_json(f"/api/studies/{entry}/sign", {"findings": "Two nodules, one calcified.",
                                                                  "impression": "Nodules."})
    assert (status, body["version"], body["status"]) == (200, 2, "C")
    _, data, _ = client.request("GET", f"/api/studies/{entry}")
    study = json.loads(data)
    assert [(v["version"], v["status"], v["findings"]) for v in study["versions"]] == [
        (1, "F", "Two nodules."), (2, "C", "Two nodules, one calcified.")]
    assert not study["preliminary"] and study["can_amend"] and not study["editable"]
    assert "amend-start" in [e.action for e in store.audit_entries(entry)]


def test_one_port_serves_the_operations_endpoints_when_wired(tmp_path):
    """/healthz says ok / not ok to anyone; only an admin's session sees the checks (paths, free space). Before:
    every visitor got the home path, the broker address and the free space."""
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'w.sqlite'}")
    store = Store.from_settings(settings)
    try:
        for name, role, password in (("curie", "radiologist", "radium-226"), ("root", "admin", "admin-pass")):
            store.add_user(name, role, auth.hash_password(password), full_name=name, organization="X",
                           now=datetime.now(UTC))
        app = WorklistApp(Bridge(settings, store),
                          ops=lambda method, path, details: respond(settings, method, path, details=details))
        with RunningServer(app) as server:
            client = Client(server)
            response, data, _ = client.request("GET", "/healthz")
            assert response.status in (200, 503)
            assert json.loads(data) == {"status": "ok" if response.status == 200 else "not ok"}
            assert str(tmp_path) not in data.decode()
            radiologist, admin = Client(server), Client(server)
            radiologist.login()
            assert set(json.loads(radiologist.request("GET", "/healthz")[1])) == {"status"}
            admin.login("root", "admin-pass")
            response, data, _ = admin.request("GET", "/healthz")
            document = json.loads(data)
            assert document["status"] == ("ok" if response.status == 200 else "not ok")
            assert set(document["checks"]) == {"index", "broker", "disk"} and "free_mb" in document["checks"]["disk"]
            response, data, _ = client.request("GET", "/metrics")
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
            response, _, _ = client.request("GET", "/")
            assert response.status == 303  # everything else is the worklist, behind its login
    finally:
        store.close()


def test_cookies_are_secure_when_served_behind_tls(tmp_path):
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'w.sqlite'}")
    store = Store.from_settings(settings)
    try:
        store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                       organization="Institut du Radium", now=datetime.now(UTC))
        with RunningServer(WorklistApp(Bridge(settings, store), secure_cookies=True)) as server:
            client = Client(server)
            _, _, login_cookies = client.request("GET", "/login")
            response, _, cookies = client.login()
            assert response.status == 303
            for cookie in [*login_cookies, *cookies]:
                assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie, cookie
    finally:
        store.close()


def test_the_study_says_which_outputs_were_not_built_and_why(web, tmp_path, database_url):
    """Before, an output that could not be built (a GSPS on a palette image, an ORU under the skip policy) was
    visible only in ``raddraft status``; the radiologist reading the draft now sees it too."""
    client, store, entry, _ = web
    client.login()
    study = store.get_study(entry)
    _, data, _ = client.request("GET", f"/api/studies/{entry}")
    assert json.loads(data)["outputs_not_built"] == []
    folder = settings_for(tmp_path, database_url).outbox_dir / study.study_uid / str(study.episode_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "outputs.json").write_text(json.dumps({"built": ["sr"], "problems": [
        {"kind": "gsps", "state": "skipped", "reason": "a PALETTE COLOR image: no presentation state fits it"}]}))
    _, data, _ = client.request("GET", f"/api/studies/{entry}")
    assert json.loads(data)["outputs_not_built"] == [
        "gsps skipped: a PALETTE COLOR image: no presentation state fits it"]
