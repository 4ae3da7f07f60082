"""The raddraft storage SCP: AE construction (all storage SOP classes × all transfer syntaxes), TLS, start/stop."""

from __future__ import annotations

import logging
import ssl

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from core.settings import Settings
from dicom_node import handlers
from dicom_node.receive import InstanceReceiver
from dicom_node.transport import GuardedAssociationServer, TransportLimits, start_server

log = logging.getLogger(__name__)

MAXIMUM_PDU_SIZE = 1024 * 1024  # what peers may send us per P-DATA PDU; fewer PDUs per instance

# The acceptor's order decides when a peer proposes several in one context: Explicit VR Little Endian first
# (keeps the VRs of private elements), then every other syntax, so compressed-only proposals are accepted as is.
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, *(ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian)]


def build_ae(settings: Settings) -> AE:
    """An AE that accepts every storage SOP class pynetdicom knows, in every transfer syntax, and Verification.

    Turns on pynetdicom's chunked receive (a process-global setting)."""
    # Chunked receive: pynetdicom writes each C-STORE data set to a file as its PDUs arrive (preamble, file meta
    # built from the request, the data set as received) instead of holding it in memory, so memory per instance
    # no longer grows with its size (issue 17). This is pynetdicom's documented _config module and a
    # PROCESS-GLOBAL switch: it applies to every AE in this process that receives a C-STORE, not only this one.
    # The file goes to tempfile.gettempdir() (pynetdicom has no setting for its directory: set TMPDIR of the
    # node's process to a disk-backed directory, ideally on the spool's file system, where staging then
    # hard-links instead of copying); pynetdicom removes it after the C-STORE handler, and
    # handlers.handle_conn_close removes the partial file of a connection that drops mid-data-set.
    _config.STORE_RECV_CHUNKED_DATASET = True
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.network_timeout = settings.network_timeout_s
    # as acceptor, pynetdicom waits acse_timeout for the A-ASSOCIATE-RQ (and its ARTIM timer closes a silent
    # connection after it); dicom_node.transport holds a connection that sends part of one to the same deadline
    ae.acse_timeout = settings.association_request_timeout_s
    ae.dimse_timeout = settings.network_timeout_s
    ae.require_called_aet = settings.require_called_ae_title
    ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, TRANSFER_SYNTAXES)
    return ae


def transport_limits(settings: Settings) -> TransportLimits:
    """The connection limits of :mod:`dicom_node.transport` from the settings."""
    return TransportLimits(
        request_timeout_s=settings.association_request_timeout_s,
        network_timeout_s=settings.network_timeout_s,
        max_pdu_size=MAXIMUM_PDU_SIZE,
        max_associations=settings.max_associations,
        max_connections_per_address=settings.max_connections_per_address,
        reserved_associations=settings.reserved_associations,
        allowed_peers=tuple(settings.allowed_peers),
    )


def build_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """Server TLS context from the settings, or None when TLS is off; client certificates required with a CA."""
    if settings.tls_certificate is None:
        return None
    if settings.tls_private_key is None:
        raise ValueError("tls_private_key is required when tls_certificate is set")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=settings.tls_certificate, keyfile=settings.tls_private_key)
    if settings.tls_client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=settings.tls_client_ca)
    return context


class DicomNode:
    """The listening storage SCP. ``start()`` returns at once; ``stop()`` closes the port and open associations."""

    def __init__(self, settings: Settings, receiver: InstanceReceiver) -> None:
        self.settings = settings
        self.receiver = receiver
        self.ae = build_ae(settings)
        self._server: GuardedAssociationServer | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when ``dicom_port`` is 0."""
        if self._server is None:
            raise RuntimeError("the DICOM node is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> tuple[str, int]:
        event_handlers = [
            (evt.EVT_CONN_OPEN, handlers.handle_conn_open),
            (evt.EVT_CONN_CLOSE, handlers.handle_conn_close),
            (evt.EVT_DATA_SENT, handlers.handle_data_sent),
            (evt.EVT_REQUESTED, handlers.handle_requested, [list(self.settings.allowed_peers)]),
            (evt.EVT_ACCEPTED, handlers.handle_accepted, [self.receiver]),
            (evt.EVT_C_ECHO, handlers.handle_echo),
            (evt.EVT_C_STORE, handlers.handle_store, [self.receiver]),
        ]
        self._server = start_server(
            self.ae,
            (self.settings.dicom_bind, self.settings.dicom_port),
            limits=transport_limits(self.settings),
            evt_handlers=event_handlers,
            ssl_context=build_ssl_context(self.settings),
        )
        host, port = self.address
        log.info("DICOM node %s listening on %s:%d%s", self.settings.ae_title, host, port,
                 " (TLS)" if self.settings.tls_enabled else "")
        return host, port

    def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()
        for assoc in server.active_associations:
            assoc.abort()
            handlers.discard_partial_receive(assoc)
        log.info("DICOM node %s stopped", self.settings.ae_title)
