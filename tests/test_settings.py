"""Settings: defaults, environment, TOML file, precedence and validation messages."""

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import Destination, HL7Destination, PeerSpec, Settings, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("RADDRAFT_"):
            monkeypatch.delenv(key)


def test_defaults_are_the_documented_ones():
    settings = load_settings()
    assert settings.home == Path("./var")
    assert settings.ae_title == "RADDRAFT"
    assert settings.dicom_port == 11112
    assert settings.study_idle_seconds == 10
    assert settings.allowed_peers == []
    assert (settings.association_request_timeout_s, settings.max_connections_per_address,
            settings.reserved_associations) == (5.0, 8, 4)
    assert settings.broker_url is None
    assert settings.uses_embedded_broker
    assert not settings.uses_sqlite_broker
    # the owned redis-server's unix socket (workers/owned_redis.py), not a polled SQLite file
    assert settings.effective_broker_url.startswith("redis+socket:///")
    assert settings.effective_broker_url.endswith("/var/run/broker.sock")


def test_the_sqlite_transport_is_an_explicit_opt_in(tmp_path):
    settings = Settings(home=tmp_path, broker_url=f"sqla+sqlite:///{tmp_path}/broker.sqlite")
    assert settings.uses_sqlite_broker and not settings.uses_embedded_broker
    assert settings.effective_broker_url == f"sqla+sqlite:///{tmp_path}/broker.sqlite"


def test_environment_overrides_toml_and_toml_overrides_defaults(tmp_path, monkeypatch):
    config = tmp_path / "raddraft.toml"
    config.write_text('ae_title = "FROMFILE"\ndicom_port = 4242\nstudy_idle_seconds = 3.5\n')
    monkeypatch.setenv("RADDRAFT_DICOM_PORT", "5555")
    settings = load_settings(config)
    assert settings.ae_title == "FROMFILE"
    assert settings.dicom_port == 5555
    assert settings.study_idle_seconds == 3.5


def test_lists_from_environment_accept_commas_and_spaces(monkeypatch):
    monkeypatch.setenv("RADDRAFT_ALLOWED_PEERS", "ORTHANC@127.0.0.1, CT1@10.1.0.0/16 MR2@localhost")
    monkeypatch.setenv("RADDRAFT_DICOM_DESTINATIONS", "PACS@pacs.example:104")
    monkeypatch.setenv("RADDRAFT_HL7_DESTINATIONS", "ris.example:2575,[::1]:6661")
    monkeypatch.setenv("RADDRAFT_BROKER_URL", "redis://127.0.0.1:6379/0")
    settings = load_settings()
    assert [str(p) for p in settings.allowed_peers] == ["ORTHANC@127.0.0.1", "CT1@10.1.0.0/16", "MR2@localhost"]
    assert settings.dicom_destinations == [Destination(ae_title="PACS", host="pacs.example", port=104)]
    assert settings.hl7_destinations == [HL7Destination(host="ris.example", port=2575),
                                         HL7Destination(host="::1", port=6661)]
    assert not settings.uses_embedded_broker
    assert settings.effective_broker_url == "redis://127.0.0.1:6379/0"


def test_ae_titles_with_spaces_in_peers_and_destinations(monkeypatch, tmp_path):
    """Before: the lists were split on whitespace too, so 'MY SCU@10.0.0.1' became 'MY' (no host) and 'SCU@…'."""
    monkeypatch.setenv("RADDRAFT_ALLOWED_PEERS", "MY SCU@127.0.0.1, CT 1@10.1.0.0/16\nMR2@localhost")
    monkeypatch.setenv("RADDRAFT_DICOM_DESTINATIONS", "MAIN PACS@pacs.example:104, ARCHIVE@[::1]:11112")
    settings = load_settings()
    assert [p.ae_title for p in settings.allowed_peers] == ["MY SCU", "CT 1", "MR2"]
    assert settings.allowed_peers[0].matches("MY SCU  ", "127.0.0.1")  # the PDU's padding is not significant
    assert not settings.allowed_peers[0].matches("MY", "127.0.0.1")
    assert [str(d) for d in settings.dicom_destinations] == ["MAIN PACS@pacs.example:104", "ARCHIVE@::1:11112"]
    monkeypatch.setenv("RADDRAFT_ALLOWED_PEERS", "MY SCU@host one")
    with pytest.raises(ValueError, match="host 'host one' must not contain spaces"):
        load_settings()
    monkeypatch.delenv("RADDRAFT_ALLOWED_PEERS")
    config = tmp_path / "raddraft.toml"
    config.write_text('allowed_peers = ["MY SCU@127.0.0.1", "OTHER@10.0.0.0/8"]\n')
    assert [str(p) for p in load_settings(config).allowed_peers] == ["MY SCU@127.0.0.1", "OTHER@10.0.0.0/8"]


def test_peer_matching_by_address_network_and_name():
    assert PeerSpec.parse("ORTHANC@127.0.0.1").matches("ORTHANC", "127.0.0.1")
    assert not PeerSpec.parse("ORTHANC@127.0.0.1").matches("ORTHANC", "127.0.0.2")
    assert not PeerSpec.parse("ORTHANC@127.0.0.1").matches("OTHER", "127.0.0.1")
    assert PeerSpec.parse("CT@127.0.0.0/8").matches("CT", "127.9.9.9")
    assert PeerSpec.parse("CT@localhost").matches("CT", "127.0.0.1")
    assert not PeerSpec.parse("CT@localhost").matches("CT", "not-an-ip")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("RADDRAFT_AE_TITLE", "THIS_AE_TITLE_IS_TOO_LONG", "1-16 printable ASCII"),
        ("RADDRAFT_AE_TITLE", "BACK\\SLASH", "without a backslash"),
        ("RADDRAFT_ALLOWED_PEERS", "NOHOST", "must be written AETITLE@host"),
        ("RADDRAFT_DICOM_DESTINATIONS", "PACS@host", "must be written AETITLE@host:port"),
        ("RADDRAFT_HL7_DESTINATIONS", "ris.example", "must be written host:port"),
        ("RADDRAFT_DICOM_PORT", "70000", "less than or equal to 65535"),
        ("RADDRAFT_STUDY_IDLE_SECONDS", "0", "greater than 0"),
        ("RADDRAFT_TLS_CERTIFICATE", "/nonexistent/cert.pem", "does not exist"),
        ("RADDRAFT_RESERVED_ASSOCIATIONS", "16", r"reserved_associations \(16\) must be less than max_associations "
         r"\(16\)"),
        ("RADDRAFT_ASSOCIATION_REQUEST_TIMEOUT_S", "0", "greater than 0"),
        ("RADDRAFT_UNKNOWN_SETTING", "1", None),
    ],
)
def test_bad_values_are_refused_with_a_message_naming_them(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    if message is None:
        # Unknown RADDRAFT_* variables are ignored by the environment source (they may belong to a newer
        # version); unknown keys in a TOML file are an error (see the next test).
        load_settings()
        return
    with pytest.raises(ValidationError, match=message):
        load_settings()


def test_unknown_key_in_toml_file_is_an_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('ae_titel = "TYPO"\n')
    with pytest.raises(ValidationError, match="ae_titel"):
        load_settings(config)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_tls_certificate_needs_a_key(tmp_path, monkeypatch):
    cert = tmp_path / "cert.pem"
    cert.write_text("not checked here")
    monkeypatch.setenv("RADDRAFT_TLS_CERTIFICATE", str(cert))
    with pytest.raises(ValueError, match="tls_private_key is required"):
        load_settings()
