"""Association security: called AE title, allowed peers (A-ASSOCIATE-RJ) and DICOM TLS with client certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from node_helpers import PYDICOM_TEST_FILES, SCU_AE, make_ct, node_settings, running_node
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from dicom_node.statuses import StoreStatus


def test_unknown_calling_ae_is_rejected_and_a_listed_peer_is_served(tmp_path, caplog):
    settings = node_settings(tmp_path / "home", allowed_peers="GOODSCU@127.0.0.1, OTHER@10.0.0.0/8")
    with running_node(settings) as node:
        rejected = node.associate(ae_title="BADSCU")
        assert rejected.is_rejected
        assert any("'BADSCU'" in r.getMessage() and "allowed_peers" in r.getMessage() for r in caplog.records)
        accepted = node.associate(ae_title="GOODSCU")
        assert accepted.is_established
        assert accepted.send_c_store(make_ct()).Status == StoreStatus.SUCCESS
        accepted.release()


def test_a_listed_peer_whose_ae_title_has_a_space_is_served(tmp_path):
    settings = node_settings(tmp_path / "home", allowed_peers="MY SCU@127.0.0.1, OTHER@10.0.0.0/8")
    with running_node(settings) as node:
        assoc = node.associate(ae_title="MY SCU")
        assert assoc.is_established
        assoc.release()
        assert node.associate(ae_title="MY").is_rejected


def test_listed_ae_title_from_an_unlisted_host_is_rejected(tmp_path):
    with running_node(node_settings(tmp_path / "home", allowed_peers="GOODSCU@10.1.2.3")) as node:
        assoc = node.associate(ae_title="GOODSCU")
        assert assoc.is_rejected
        assert node.index.count_instances() == 0


def test_wrong_called_ae_title_is_rejected_when_required(tmp_path):
    with running_node(node_settings(tmp_path / "home")) as node:
        assert node.associate(called="SOMEONEELSE").is_rejected
    with running_node(node_settings(tmp_path / "home2", require_called_ae_title=False)) as lenient:
        assoc = lenient.associate(called="SOMEONEELSE")
        assert assoc.is_established
        assoc.release()


def _associate_rq(calling: bytes, called: bytes) -> bytes:
    """A valid A-ASSOCIATE-RQ (pynetdicom's encoder) with raw bytes patched into its 16-byte AE title fields."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "PLACEHOLDER", "RADDRAFT"
    primitive.maximum_length_received = 16382
    primitive.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.0"
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    data = bytearray(pdu.encode())
    data[10:26], data[26:42] = called.ljust(16, b" "), calling.ljust(16, b" ")
    return bytes(data)


@pytest.mark.parametrize(("calling", "called", "reason", "logged"), [
    (b"", b"RADDRAFT", 0x03, "calling AE title '' is empty"),
    (b"AB\x00CD", b"RADDRAFT", 0x03, "calling AE title 'AB\\x00CD' contains a NUL byte"),
    (b"AB\\CD", b"RADDRAFT", 0x03, "calling AE title 'AB\\\\CD' contains a backslash"),
    (b"NODETEST", b"", 0x07, "called AE title '' is empty"),
])
@pytest.mark.parametrize("allowed_peers", ["", "GOODSCU@127.0.0.1"])
def test_an_empty_nul_or_backslash_ae_title_is_rejected_with_its_reason(tmp_path, caplog, calling, called, reason,
                                                                        logged, allowed_peers):
    """Before: pynetdicom could not decode such an A-ASSOCIATE-RQ and aborted (A-ABORT) with a traceback."""
    with running_node(node_settings(tmp_path / "home", allowed_peers=allowed_peers)) as node:
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
            sock.sendall(_associate_rq(calling, called))
            reply = sock.recv(64)
        # A-ASSOCIATE-RJ: type 3, length 4, result permanent (1), source service-user (1), the AE title's reason
        assert reply == bytes([0x03, 0, 0, 0, 0, 4, 0, 1, 1, reason])
        assert any(logged in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records), [
            r.getMessage() for r in caplog.records]
        assert not any("Unable to decode" in r.getMessage() for r in caplog.records)
        assoc = node.associate([Verification], ae_title="GOODSCU")  # the node goes on serving
        assert assoc.is_established
        assoc.release()


# --- TLS -----------------------------------------------------------------------------------------------------------
def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject, issuer, public_key, signing_key, *, ca=False, san=None):
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _write(path, cert, key=None):
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A self-signed CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(_name("raddraft test CA"), _name("raddraft test CA"), ca_key.public_key(), ca_key, ca=True)
    _write(folder / "ca", ca)
    for role, san in (("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                      ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(folder / role, _certificate(_name(f"raddraft {role}"), ca.subject, key.public_key(), ca_key, san=san),
               key)
    return folder


def _client_context(pki, with_certificate):
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki / "ca.crt")
    if with_certificate:
        context.load_cert_chain(pki / "client.crt", pki / "client.key")
    return context


def test_tls_association_with_client_certificate(tmp_path, pki):
    settings = node_settings(tmp_path / "home", tls_certificate=pki / "server.crt",
                             tls_private_key=pki / "server.key", tls_client_ca=pki / "ca.crt")
    with running_node(settings) as node:
        assoc = node.associate([Verification], tls_args=(_client_context(pki, True), "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        secure = node.associate(tls_args=(_client_context(pki, True), "127.0.0.1"))
        assert secure.send_c_store(make_ct()).Status == StoreStatus.SUCCESS
        secure.release()

        without_certificate = node.associate([Verification], tls_args=(_client_context(pki, False), "127.0.0.1"))
        assert not without_certificate.is_established
        plain = node.associate([Verification])
        assert not plain.is_established
        assert node.index.count_instances() == 1


def test_tls_without_a_client_ca_accepts_clients_without_certificates(tmp_path, pki):
    settings = node_settings(tmp_path / "home", tls_certificate=pki / "server.crt", tls_private_key=pki / "server.key")
    with running_node(settings) as node:
        assoc = node.associate(tls_args=(_client_context(pki, False), "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_store(make_ct()).Status == StoreStatus.SUCCESS
        assoc.release()
        assert not node.associate([Verification]).is_established  # TLS is still required
        assert node.index.count_instances() == 1


def test_dcmtk_storescu_over_tls_with_a_client_certificate(tmp_path, pki):
    settings = node_settings(tmp_path / "home", tls_certificate=pki / "server.crt",
                             tls_private_key=pki / "server.key", tls_client_ca=pki / "ca.crt")
    source = PYDICOM_TEST_FILES / "CT_small.dcm"
    base = ["-aet", SCU_AE, "-aec", "RADDRAFT", "+cf", str(pki / "ca.crt")]
    with running_node(settings) as node:
        address = ["127.0.0.1", str(node.port)]
        with_certificate = ["+tls", str(pki / "client.key"), str(pki / "client.crt"), *base]
        echo = subprocess.run(["echoscu", *with_certificate, *address], check=False, capture_output=True, text=True,
                              timeout=60)
        assert echo.returncode == 0, echo.stderr
        sent = subprocess.run(["storescu", *with_certificate, *address, str(source)], check=False,
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        assert node.index.count_instances() == 1

        anonymous = subprocess.run(["storescu", "+tla", *base, *address, str(source)], check=False,
                                   capture_output=True, text=True, timeout=60)
        assert anonymous.returncode != 0 and "Association Request Failed" in anonymous.stderr  # no client cert
        plain = subprocess.run(["echoscu", "-aet", SCU_AE, "-aec", "RADDRAFT", "-to", "5", *address], check=False,
                               capture_output=True, text=True, timeout=60)
        assert plain.returncode != 0  # no TLS at all
        assert node.index.count_instances() == 1


def test_a_bad_ae_title_over_tls_is_rejected_with_its_reason_too(tmp_path, pki, caplog):
    """The AE titles are checked as the A-ASSOCIATE-RQ is read, after TLS: before, a TLS socket could not be
    peeked at and such a request was aborted with pynetdicom's traceback."""
    settings = node_settings(tmp_path / "home", tls_certificate=pki / "server.crt", tls_private_key=pki / "server.key")
    with running_node(settings) as node:
        context = _client_context(pki, False)
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(_associate_rq(b"AB\\CD", b"RADDRAFT"))
            reply = sock.recv(64)
        assert reply == bytes([0x03, 0, 0, 0, 0, 4, 0, 1, 1, 0x03])
        assert any("calling AE title 'AB\\\\CD' contains a backslash" in r.getMessage() for r in caplog.records)
        assoc = node.associate([Verification], tls_args=(_client_context(pki, False), "127.0.0.1"))
        assert assoc.is_established  # the node goes on serving
        assoc.release()
