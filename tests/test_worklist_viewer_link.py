"""The "open in viewer" link to the hospital's own viewer: the setting (``RADDRAFT_VIEWER_URL_TEMPLATE``), checked
at start-up, and the link on the worklist rows and the study page (absent when unset), over real HTTP."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from urllib.parse import quote

import pytest
from pydantic import ValidationError
from worklist_helpers import Client, settings_for, write_draft

from core.settings import load_settings
from worklist import auth
from worklist.app import WorklistApp, viewer_link
from worklist.bridge import Bridge
from worklist.server import RunningServer
from worklist.storage import Store

TEMPLATE = "https://pacs.example.org/viewer?StudyInstanceUIDs={study_uid}&mode=read"


@pytest.mark.parametrize(("value", "error"), [
    ("ftp://pacs.example.org/{study_uid}", "viewer_url_template must be an http:// or https:// URL"),
    ("javascript:alert(1)//{study_uid}", "viewer_url_template must be an http:// or https:// URL"),
    ("https://pacs.example.org/viewer", "viewer_url_template must contain {study_uid}"),
    ("https://pacs.example.org/{study_uid}/{accession}", "may hold no placeholder but {study_uid}"),
])
def test_a_bad_template_is_refused_at_start_up(tmp_path, value, error):
    with pytest.raises(ValidationError, match=error):
        load_settings(home=tmp_path, viewer_url_template=value)


def test_the_template_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RADDRAFT_VIEWER_URL_TEMPLATE", TEMPLATE)
    assert load_settings(home=tmp_path).viewer_url_template == TEMPLATE
    monkeypatch.setenv("RADDRAFT_VIEWER_URL_TEMPLATE", "")
    assert load_settings(home=tmp_path).viewer_url_template is None


def _served(tmp_path, **overrides):
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'worklist.sqlite'}", **overrides)
    store = Store.from_settings(settings)
    store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                   organization="IR", now=datetime.now(UTC))
    bridge = Bridge(settings, store)
    draft = write_draft(settings, accession="ACC-9")
    return store, bridge, bridge.register_draft(draft.manifest_path, draft.result_path), draft


def test_each_study_links_to_the_hospital_viewer(tmp_path):
    store, bridge, entry, draft = _served(tmp_path, viewer_url_template=TEMPLATE)
    try:
        with RunningServer(WorklistApp(bridge)) as server:
            client = Client(server)
            client.login()
            expected = TEMPLATE.replace("{study_uid}", quote(draft.phantom.study_uid, safe=""))
            listing = json.loads(client.request("GET", "/api/studies")[1])
            assert [row["viewer_url"] for row in listing["studies"]] == [expected]
            study = json.loads(client.request("GET", f"/api/studies/{entry}")[1])
            assert study["viewer_url"] == expected
            assert b"<th>Viewer</th>" in client.request("GET", "/")[1]
    finally:
        store.close()
    assert bridge.settings.viewer_url_template == TEMPLATE


def test_no_link_without_a_template(tmp_path):
    store, bridge, entry, _ = _served(tmp_path)
    try:
        with RunningServer(WorklistApp(bridge)) as server:
            client = Client(server)
            client.login()
            listing = json.loads(client.request("GET", "/api/studies")[1])
            assert [row["viewer_url"] for row in listing["studies"]] == [None]
            assert json.loads(client.request("GET", f"/api/studies/{entry}")[1])["viewer_url"] is None
            assert b"<th>Viewer</th>" not in client.request("GET", "/")[1]
    finally:
        store.close()


def test_the_study_uid_is_url_encoded_in_the_link():
    assert viewer_link("https://v.example/s/{study_uid}?a={study_uid}", "1.2.3/../4?x=1&y") == \
        "https://v.example/s/1.2.3%2F..%2F4%3Fx%3D1%26y?a=1.2.3%2F..%2F4%3Fx%3D1%26y"
