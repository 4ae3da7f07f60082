"""DICOM over TLS: ``raddraft send --tls-ca`` to a dcmtk storescp serving TLS with a self-signed certificate."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from core.settings import Destination
from dicom_node.scu import PeerUnreachableError, send_instances
from peers import StoreSCP

CT = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


def self_signed(folder: Path, common_name: str = "storescp-test") -> tuple[Path, Path]:
    """A P-256 key and a self-signed certificate for 127.0.0.1 (also its own CA): (key.pem, cert.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = folder / "key.pem", folder / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_send_over_tls_verifies_the_peer_and_delivers(tmp_path):
    key, cert = self_signed(tmp_path / "pki")
    with StoreSCP(tmp_path / "scp", tls=(key, cert)) as peer:
        destination = Destination(ae_title=peer.aet, host="127.0.0.1", port=peer.port)
        context = ssl.create_default_context(cafile=str(cert))

        summary = send_instances(destination, [CT], tls_context=context)

        assert summary.ok, summary.failed
        [received] = peer.received()
        assert pydicom.dcmread(received).SOPInstanceUID == pydicom.dcmread(CT).SOPInstanceUID


def test_an_untrusted_peer_certificate_is_refused(tmp_path):
    key, cert = self_signed(tmp_path / "pki")
    _, other_ca = self_signed(tmp_path / "other", common_name="someone-else")
    with StoreSCP(tmp_path / "scp", tls=(key, cert)) as peer:
        destination = Destination(ae_title=peer.aet, host="127.0.0.1", port=peer.port)
        context = ssl.create_default_context(cafile=str(other_ca))

        with pytest.raises(PeerUnreachableError, match=r"cannot connect to DICOM destination STORESCP@127\.0\.0\.1"):
            send_instances(destination, [CT], tls_context=context, connection_timeout_s=5)
        assert peer.received() == []


def test_cli_tls_ca_option(tmp_path):
    key, cert = self_signed(tmp_path / "pki")
    with StoreSCP(tmp_path / "scp", tls=(key, cert)) as peer:
        env = {**os.environ, "RADDRAFT_HOME": str(tmp_path / "home")}
        done = subprocess.run(
            [sys.executable, "-m", "raddraft.cli", "send", str(CT), "--to", f"{peer.aet}@127.0.0.1:{peer.port}",
             "--tls-ca", str(cert)],
            check=False, capture_output=True, text=True, timeout=120, env=env,
        )
        assert done.returncode == 0, done.stderr
        assert "1 ok, 0 warning, 0 failed" in done.stdout
        assert len(peer.received()) == 1
