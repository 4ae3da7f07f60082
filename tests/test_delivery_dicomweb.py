"""DICOMweb delivery (issue 20): a report stage's DICOM outputs over STOW-RS, on real loopback peers.

Peers: Orthanc with its DICOMweb plugin (done, the SR found over QIDO-RS; HTTP basic authentication right and
wrong), a port nothing listens on (down), and raddraft's own STOW-RS endpoint (dicom_node/stow.py, a real STOW-RS
server that requires a bearer token and answers 202 with a Failed SOP Sequence when it refuses some instances).
Orthanc 1.10 with DICOMweb plugin 1.7 never answers a partial 202: it refuses a whole request with 400 (an
instance it cannot index) and reports an instance its Lua filter dropped as stored, hence the other server.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from test_pipeline_gate import _prepared
from test_pipeline_report_reads import _response
from test_stow_ingest import TOKEN, gateway

from core.settings import Settings, load_settings, normalize_dicomweb_url, read_dicomweb_auth_file
from core.states import DeliveryState
from peers import DICOMWEB_PLUGIN, Orthanc, free_port
from raddraft.commands import status
from state.store import Delivery, StateStore
from workers import deadletter, delivery, pipeline
from workers.celery_app import DELIVER_TASK
from worklist.delivery import delivery_targets

pytestmark = pytest.mark.skipif(not DICOMWEB_PLUGIN.exists(), reason="Orthanc's DICOMweb plugin is not installed")

USER, PASSWORD = "raddraft", "right-password-123"
SECRETS = ("right-password-123", "wrong-password-456", TOKEN, "wrong-token-0123456789")


def reported(tmp_path: Path, **settings: Any) -> tuple[Settings, str, pipeline.ReportOutcome]:
    """A study through the report stage (its draft set in the outbox) with *settings* (the destinations)."""
    base, study = _prepared(tmp_path, ["CT_small.dcm"])
    configured = updated(base, **settings)
    request = pipeline.prepare_request(configured, study, 1)
    outcome = pipeline.report_episode(configured, _response(request), publish=lambda *_: None)
    assert outcome is not None
    return configured, study, outcome


def updated(settings: Settings, **changes: Any) -> Settings:
    """*settings* with *changes*, validated (parsed) as at start-up."""
    return Settings.model_validate({**settings.model_dump(), **changes})


def dicomweb_row(settings: Settings, study: str) -> Delivery:
    store = StateStore(settings.index_path)
    try:
        [row] = [d for d in store.deliveries(study, 1) if d.kind == delivery.DICOMWEB and d.output_set == "draft"]
    finally:
        store.close()
    return row


def deliver(settings: Settings, study: str) -> tuple[bool | BaseException, Delivery]:
    """Run the delivery of the study's DICOMweb row once: its result (or the error it raised) and the row after."""
    key = dicomweb_row(settings, study).key
    store = StateStore(settings.index_path)
    try:
        try:
            result: bool | BaseException = delivery.run(settings, store, key, publish=lambda *_: None)
        except delivery.DeliveryError as exc:
            result = exc
        return result, store.delivery(key)
    finally:
        store.close()


def sent_uids(outcome: pipeline.ReportOutcome) -> list[str]:
    return [str(entry.sop_instance_uid) for entry in outcome.entries if entry.delivery == "dicom"]


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def auth_file(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "dicomweb-auth"
    path.write_text("# DICOMweb credentials\n\n" + "\n".join(lines) + "\n")
    return path


# --- Orthanc's DICOMweb plugin ---------------------------------------------------------------------------------
def test_draft_set_is_stored_in_orthanc_over_stow_rs(tmp_path, caplog):
    with Orthanc(tmp_path / "orthanc", dicomweb=True) as orthanc:
        settings, study, outcome = reported(tmp_path, dicomweb_destinations=[orthanc.dicomweb_url + "/"])
        row = dicomweb_row(settings, study)
        assert row.destination == orthanc.dicomweb_url  # the base URL as configured, without the trailing slash
        assert row.output_set == "draft" and row.state is DeliveryState.PENDING
        with caplog.at_level(logging.INFO, logger="workers.delivery"):
            result, row = deliver(settings, study)
        assert result is True, result
        assert row.state is DeliveryState.DONE and row.attempts == 1 and row.last_error is None
        uids = sent_uids(outcome)
        assert len(uids) >= 2  # the SR, the narrative, the GSPS
        assert set(uids) <= orthanc.sop_instance_uids()
        sr = next(entry for entry in outcome.entries if entry.kind == "sr")
        found = DICOMwebClient(orthanc.dicomweb_url).search_for_instances(
            search_filters={"SOPInstanceUID": str(sr.sop_instance_uid)})
        assert len(found) == 1  # QIDO-RS finds the SR
        assert "object(s) stored over STOW-RS" in caplog.text
        # a duplicate task does nothing
        again, row = deliver(settings, study)
        assert again is False and row.attempts == 1


def test_a_peer_that_is_down_is_transient_and_the_row_keeps_the_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    settings, study, _ = reported(tmp_path, dicomweb_destinations=[url], network_timeout_s=5.0)
    result, row = deliver(settings, study)
    assert isinstance(result, delivery.TransientDeliveryError), result
    assert f"DICOMweb destination {url} is not reachable" in str(result)
    assert row.state is DeliveryState.PENDING and row.attempts == 1
    assert row.last_error is not None and "not reachable" in row.last_error
    result, row = deliver(settings, study)
    assert isinstance(result, delivery.TransientDeliveryError) and row.attempts == 2


def test_orthanc_basic_authentication_right_and_wrong(tmp_path, caplog):
    with Orthanc(tmp_path / "orthanc", dicomweb=True, users={USER: PASSWORD}) as orthanc:
        url = orthanc.dicomweb_url
        wrong = auth_file(tmp_path, [f"{url} basic {USER} wrong-password-456"])
        settings, study, outcome = reported(tmp_path, dicomweb_destinations=[url], dicomweb_auth_file=wrong)
        with caplog.at_level(logging.DEBUG):
            result, row = deliver(settings, study)
        assert isinstance(result, delivery.PermanentDeliveryError), result
        assert str(result) == f"DICOMweb destination {url} refused the credentials: HTTP 401 Unauthorized"
        assert row.state is DeliveryState.PENDING and row.attempts == 1 and row.last_error == str(result)
        assert orthanc.instances() == []
        assert_no_secret(caplog.text, str(result), repr(settings))

        right = auth_file(tmp_path, [f"{url} basic {USER} {PASSWORD}"])
        settings = updated(settings, dicomweb_auth_file=right)
        result, row = deliver(settings, study)
        assert result is True and row.state is DeliveryState.DONE and row.attempts == 2
        assert set(sent_uids(outcome)) <= orthanc.sop_instance_uids()
        # the same Orthanc refuses a client without credentials: the 401 above is Orthanc's, not a client's
        with pytest.raises(Exception, match="401"):
            DICOMwebClient(url).search_for_studies()
        assert DICOMwebClient(url, session=create_session_from_user_pass(USER, PASSWORD)).search_for_studies()


# --- raddraft's own STOW-RS endpoint (bearer token; 202 with a Failed SOP Sequence) ----------------------------
def test_bearer_token_right_is_done_and_wrong_is_permanent(tmp_path, caplog):
    with gateway(tmp_path / "peer") as peer:
        url = f"{peer.url}/dicomweb"
        settings, study, outcome = reported(tmp_path, dicomweb_destinations=[url],
                                            dicomweb_bearer_token="wrong-token-0123456789")
        with caplog.at_level(logging.DEBUG):
            result, row = deliver(settings, study)
        assert isinstance(result, delivery.PermanentDeliveryError), result
        assert "HTTP 401" in str(result) and row.attempts == 1
        assert peer.index.count_instances() == 0
        assert_no_secret(caplog.text, str(result))

        settings = updated(settings, dicomweb_bearer_token=TOKEN)
        with caplog.at_level(logging.DEBUG):
            result, row = deliver(settings, study)
        assert result is True and row.state is DeliveryState.DONE and row.attempts == 2
        assert all(peer.index.instance(uid) is not None for uid in sent_uids(outcome))
        assert_no_secret(caplog.text)


def test_a_partial_202_is_not_done_and_names_the_failed_instance(tmp_path):
    settings, study, outcome = reported(tmp_path, dicomweb_destinations=["http://127.0.0.1:1/dicom-web"])
    sizes = {str(e.sop_instance_uid): e.path.stat().st_size for e in outcome.entries if e.delivery == "dicom"}
    largest, *others = sorted(sizes, key=sizes.get, reverse=True)
    assert others and sizes[largest] > max(sizes[uid] for uid in others) + 2048
    limit_mb = (sizes[largest] - 1024) / 1024 / 1024  # the largest output is over the peer's instance limit
    with gateway(tmp_path / "peer", max_instance_mb=limit_mb, stow_max_request_mb=16.0) as peer:
        url = f"{peer.url}/dicomweb"
        store = StateStore(settings.index_path)
        try:
            store.add_deliveries(study, 1, [(delivery.DICOMWEB, url)], 0.0)
        finally:
            store.close()
        settings = updated(settings, dicomweb_destinations=[url], dicomweb_bearer_token=TOKEN)
        key = next(d.key for d in StateStore(settings.index_path).deliveries(study, 1) if d.destination == url)
        store = StateStore(settings.index_path)
        try:
            with pytest.raises(delivery.DeliveryError) as failed:
                delivery.run(settings, store, key, publish=lambda *_: None)
            row = store.delivery(key)
        finally:
            store.close()
        message = str(failed.value)
        # the peer stored the others and refused the largest with Out of Resources (0xA700): worth a retry
        assert isinstance(failed.value, delivery.TransientDeliveryError), message
        assert f"DICOMweb destination {url} (HTTP 202) did not store 1 of {len(sizes)} object(s)" in message
        assert f"{largest}: Failure Reason 0xA700" in message
        assert all(uid not in message for uid in others)
        assert row.state is DeliveryState.PENDING and row.attempts == 1 and row.last_error == message
        assert peer.index.instance(largest) is None
        assert all(peer.index.instance(uid) is not None for uid in others)


def test_a_refused_instance_is_permanent(tmp_path):
    """An instance the peer cannot understand (its file meta names another SOP instance): 0xA900, not retried."""
    with gateway(tmp_path / "peer") as peer:
        url = f"{peer.url}/dicomweb"
        settings, study, outcome = reported(tmp_path, dicomweb_destinations=[url], dicomweb_bearer_token=TOKEN)
        sr = next(entry for entry in outcome.entries if entry.kind == "sr")
        broken = pydicom.dcmread(sr.path)
        broken.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
        broken.save_as(sr.path, enforce_file_format=False)
        result, row = deliver(settings, study)
        assert isinstance(result, delivery.PermanentDeliveryError), result
        # the peer names the instance by the UID of its file meta; the one sent is not referenced either
        assert "(HTTP 202) did not store 1 of 3 object(s): 1.2.3.4: Failure Reason 0xA900; not referenced in the " \
            f"response: {sr.sop_instance_uid}" in str(result)
        assert row.state is DeliveryState.PENDING and row.attempts == 1


# --- settings ----------------------------------------------------------------------------------------------------
def test_dicomweb_settings_from_the_environment_and_an_auth_file(tmp_path, monkeypatch, caplog):
    path = auth_file(tmp_path, ["https://pacs.example/dicom-web/ basic alice s3cret-pass",
                                "https://other.example:8443/wado bearer tok-abcdef"])
    monkeypatch.setenv("RADDRAFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RADDRAFT_DICOMWEB_DESTINATIONS",
                       "https://pacs.example/dicom-web, https://other.example:8443/wado,http://third.example/dw")
    monkeypatch.setenv("RADDRAFT_DICOMWEB_AUTH_FILE", str(path))
    monkeypatch.setenv("RADDRAFT_DICOMWEB_BEARER_TOKEN", "all-token-xyz")
    settings = load_settings()
    assert settings.dicomweb_destinations == ["https://pacs.example/dicom-web", "https://other.example:8443/wado",
                                              "http://third.example/dw"]
    pacs = settings.dicomweb_auth("https://pacs.example/dicom-web")
    assert pacs is not None and pacs.scheme == "basic" and pacs.username == "alice"
    assert pacs.secret.get_secret_value() == "s3cret-pass"
    other = settings.dicomweb_auth("https://other.example:8443/wado")
    assert other is not None and other.scheme == "bearer" and other.secret.get_secret_value() == "tok-abcdef"
    third = settings.dicomweb_auth("http://third.example/dw")  # no line: the token for all
    assert third is not None and third.scheme == "bearer" and third.secret.get_secret_value() == "all-token-xyz"
    for text in (repr(settings), str(settings.model_dump()), repr(pacs), str(pacs),
                 repr(read_dicomweb_auth_file(path))):
        assert "s3cret-pass" not in text and "tok-abcdef" not in text and "all-token-xyz" not in text
    assert settings.dicomweb_insecure is False and settings.dicomweb_ca_bundle is None
    assert delivery.dicomweb_session(settings, "https://pacs.example/dicom-web").verify is True
    assert "all-token-xyz" not in repr(delivery.dicomweb_session(settings, "http://third.example/dw").auth)

    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    with_ca = updated(settings, dicomweb_ca_bundle=bundle)
    assert delivery.dicomweb_session(with_ca, "https://pacs.example/dicom-web").verify == str(bundle)
    insecure = updated(settings, dicomweb_insecure=True)
    with caplog.at_level(logging.WARNING, logger="workers.delivery"):
        assert delivery.dicomweb_session(insecure, "https://pacs.example/dicom-web").verify is False
    assert "TLS certificate verification is OFF" in caplog.text


@pytest.mark.parametrize(("value", "message"), [
    ("https://alice:s3cret-pass@pacs.example/dw", "must not hold credentials"),
    ("ftp://pacs.example/dw", "must be written http(s)://host[:port]/path"),
    ("https://pacs.example/dw?token=s3cret-pass", "must have no query or fragment"),
    ("https://pacs.example/dw,https://pacs.example/dw/", "listed twice"),
])
def test_bad_dicomweb_destinations_are_named_without_secrets(tmp_path, value, message):
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        Settings(home=tmp_path, dicomweb_destinations=value)
    assert "s3cret-pass" not in str(refused.value)


@pytest.mark.parametrize("line", ["https://pacs.example/dw basic alice", "https://pacs.example/dw digest x y",
                                  "https://pacs.example/dw bearer s3cret-pass extra"])
def test_bad_auth_file_line_is_named_by_number_without_the_secret(tmp_path, line):
    path = auth_file(tmp_path, [line])
    with pytest.raises(ValueError, match=r"line 3: must be 'URL basic USER PASSWORD' or 'URL bearer TOKEN'") as bad:
        Settings(home=tmp_path, dicomweb_auth_file=path)
    assert "s3cret-pass" not in str(bad.value)


def test_url_normalization():
    assert normalize_dicomweb_url(" https://PACS.example:443/dicom-web/ ") == "https://PACS.example:443/dicom-web"
    with pytest.raises(ValueError, match=r"not a valid URL|out of range"):
        normalize_dicomweb_url("https://pacs.example:99999/dw")


# --- the other ends: signing's targets, raddraft status, dead letters ------------------------------------------
def test_dicomweb_rows_in_signing_status_and_dead_letters(tmp_path, capsys):
    url = "https://pacs.example/dicom-web"
    settings, study, _ = reported(tmp_path, dicomweb_destinations=[url + "/"])
    assert (delivery.DICOMWEB, url) in delivery_targets(settings)  # a signed version gets a row too
    store = StateStore(settings.index_path)
    try:
        store.add_deliveries(study, 1, delivery_targets(settings), 0.0, output_set="signed:1")
    finally:
        store.close()
    args = type("Args", (), {"json": False})()
    assert status.run(args, settings) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("delivery pending")]
    assert sorted(lines) == sorted([
        f"delivery pending: dicomweb to {url} of {study} episode 1 after 0 attempt(s)",
        f"delivery pending: dicomweb (signed version 1) to {url} of {study} episode 1 after 0 attempt(s)"])
    key = dicomweb_row(settings, study).key
    assert deadletter.delivery_of(DELIVER_TASK, delivery.task_args(key)) == key
    letter = deadletter.record(settings, DELIVER_TASK, delivery.task_id(key), delivery.task_args(key),
                               error="refused", retries=0, publish=lambda *_: None)
    assert dicomweb_row(settings, study).state is DeliveryState.DEAD
    published: list[tuple[str, list[Any], str]] = []
    deadletter.replay(settings, [letter], lambda *sent: published.append(sent))
    assert [name for name, _, _ in published] == [DELIVER_TASK] and published[0][1] == delivery.task_args(key)
    assert dicomweb_row(settings, study).state is DeliveryState.PENDING
