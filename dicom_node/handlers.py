"""pynetdicom event handlers of the raddraft DICOM node, bound with ``evt_handlers=[(evt.X, handler, [extra])]``."""

from __future__ import annotations

import logging
import select
import socket
import ssl
import time

from pynetdicom.events import Event

from core.settings import PeerSpec
from dicom_node.receive import IncomingInstance, InstanceReceiver, RejectedContext
from dicom_node.statuses import EchoStatus, RejectReason, RejectResult, RejectSource

log = logging.getLogger(__name__)

QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


ASSOCIATE_RQ = 0x01
AE_FIELDS = (("called", 10, RejectReason.CALLED_AE_NOT_RECOGNIZED),
             ("calling", 26, RejectReason.CALLING_AE_NOT_RECOGNIZED))  # PS3.8 9.3.2: offsets of the 16-byte fields
MAX_RQ_BYTES = 64 * 1024  # a longer A-ASSOCIATE-RQ is left to pynetdicom


def handle_conn_open(event: Event) -> None:
    """EVT_CONN_OPEN: disable Nagle's algorithm (small PDUs otherwise wait for delayed ACKs), and answer an
    A-ASSOCIATE-RQ whose AE title pynetdicom cannot decode with an A-ASSOCIATE-RJ (``reject_invalid_ae_title``)."""
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reject_invalid_ae_title(sock, event.assoc.requestor.address, event.assoc.acse_timeout)


def ae_title_problem(field: bytes) -> str | None:
    """Why a 16-byte AE title field of a PDU is not an AE title (PS3.5 AE: no control characters, no backslash,
    not only spaces), or None."""
    if not field.strip(b" "):
        return "is empty"
    if b"\x00" in field:
        return "contains a NUL byte"
    if b"\\" in field:
        return "contains a backslash"
    if any(byte < 0x20 or byte > 0x7E for byte in field):
        return "contains a control or non-ASCII character"
    return None


def reject_invalid_ae_title(sock: socket.socket, address: str, timeout: float | None) -> bool:
    """Peek at the first PDU of a plain-TCP connection: an A-ASSOCIATE-RQ with an empty, NUL- or
    backslash-containing called or calling AE title is read, answered with an A-ASSOCIATE-RJ (permanent,
    service-user, AE title not recognized) and the connection closed, with the reason logged. pynetdicom would
    fail to decode it and abort the association with a traceback. True if rejected. (A TLS socket cannot be
    peeked at: such an RQ is still aborted there.)"""
    if isinstance(sock, ssl.SSLSocket):
        return False
    head = _peek(sock, 42, timeout)
    if len(head) < 42 or head[0] != ASSOCIATE_RQ:
        return False
    found = [(name, offset, reason, problem) for name, offset, reason in AE_FIELDS
             if (problem := ae_title_problem(head[offset:offset + 16])) is not None]
    if not found:
        return False
    name, offset, reason, problem = found[-1]  # the calling AE title's reason first
    length = int.from_bytes(head[2:6], "big") + 6
    if length > MAX_RQ_BYTES:
        return False
    log.warning("association from %s rejected: %s AE title %r %s (A-ASSOCIATE-RJ)", address, name,
                head[offset:offset + 16].rstrip(b" ").decode("latin-1"), problem)
    try:
        _read_exactly(sock, length)
        sock.sendall(bytes([0x03, 0, 0, 0, 0, 4, 0, RejectResult.PERMANENT, RejectSource.SERVICE_USER, reason]))
        sock.shutdown(socket.SHUT_RDWR)  # pynetdicom then reads the end of the connection and stops quietly
    except OSError as exc:
        log.debug("association from %s: rejection not sent: %s", address, exc)
    return True


def _peek(sock: socket.socket, count: int, timeout: float | None) -> bytes:
    """Up to *count* bytes of what the peer sent, left in the socket for pynetdicom; waits at most *timeout*."""
    deadline = time.monotonic() + (timeout if timeout is not None else 60.0)
    data = b""
    try:
        while len(data) < count:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                break
            data = sock.recv(count, socket.MSG_PEEK)
            if not data or len(data) >= count:
                break
            time.sleep(0.005)  # the rest of the PDU header is on its way
    except OSError:
        return b""
    return data


def _read_exactly(sock: socket.socket, count: int) -> None:
    while count > 0:
        chunk = sock.recv(min(count, 4096))
        if not chunk:
            return
        count -= len(chunk)


def handle_data_sent(event: Event) -> None:
    """EVT_DATA_SENT: leave delayed-ACK ("pingpong") mode so the peer's next small segment is ACKed at once.

    Linux enters pingpong mode when we send soon after receiving (our C-STORE response) and then delays the ACK
    of the peer's next segment by up to 40 ms. A peer with Nagle's algorithm on (dcmtk's storescu by default)
    writes the next request as a 12-byte PDU header and its body; the body waits for that delayed ACK, once per
    instance. ``TCP_QUICKACK`` after each send undoes the mode; it is Linux-only and not sticky, hence per send.
    """
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
    if sock is not None and QUICKACK is not None:
        sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)


def handle_requested(event: Event, allowed_peers: list[PeerSpec]) -> None:
    """EVT_REQUESTED: reject a calling AE title / address pair that is not in *allowed_peers* (if any)."""
    if not allowed_peers:
        return
    requestor = event.assoc.requestor  # its ae_title is only filled in after EVT_REQUESTED; read the request
    calling_ae, address = str(requestor.primitive.calling_ae_title).strip(), requestor.address
    if any(peer.matches(calling_ae, address) for peer in allowed_peers):
        return
    log.warning("association from %r at %s rejected: not in allowed_peers", calling_ae, address)
    event.assoc.acse.send_reject(
        RejectResult.PERMANENT, RejectSource.SERVICE_USER, RejectReason.CALLING_AE_NOT_RECOGNIZED
    )
    # as pynetdicom's own ACSE does after a rejection: wait for the DUL to send the A-ASSOCIATE-RJ and stop,
    # otherwise the server closes the socket first and the peer sees an abort instead of the rejection
    event.assoc.kill()


def handle_accepted(event: Event, receiver: InstanceReceiver) -> None:
    """EVT_ACCEPTED: log and count the presentation contexts the negotiation rejected (e.g. a retired SOP class).

    ``assoc.rejected_contexts`` keeps only the first proposed transfer syntax of a rejected context; the peer's
    whole proposal is in ``assoc.requestor.requested_contexts`` under the same context ID.
    """
    assoc = event.assoc
    if not assoc.rejected_contexts:
        return
    proposed = {context.context_id: context for context in assoc.requestor.requested_contexts}
    rejected = []
    for context in assoc.rejected_contexts:
        offer = proposed.get(context.context_id, context)
        rejected.append(RejectedContext(
            context_id=int(context.context_id or 0),
            abstract_syntax=str(context.abstract_syntax),
            transfer_syntaxes=tuple(str(syntax) for syntax in offer.transfer_syntax),
            result=context.status,
        ))
    receiver.note_rejected_contexts(assoc.requestor.ae_title, assoc.requestor.address, rejected)


def handle_echo(event: Event) -> int:
    """EVT_C_ECHO: always answer Success."""
    return EchoStatus.SUCCESS


def handle_store(event: Event, receiver: InstanceReceiver) -> int:
    """EVT_C_STORE: persist the dataset exactly as received (file meta + encoded bytes) and answer its status."""
    context = event.context
    requestor = event.assoc.requestor
    incoming = IncomingInstance(
        data=event.encoded_dataset(include_meta=True),
        abstract_syntax=str(context.abstract_syntax),
        affected_sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
        transfer_syntax_uid=str(context.transfer_syntax),
        calling_ae=requestor.ae_title,
        peer_address=requestor.address,
    )
    return int(receiver.receive(incoming))
