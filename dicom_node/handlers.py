"""pynetdicom event handlers of the raddraft DICOM node, bound with ``evt_handlers=[(evt.X, handler, [extra])]``."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

from pynetdicom.events import Event

from core.settings import PeerSpec
from dicom_node.receive import IncomingInstance, InstanceReceiver, RejectedContext
from dicom_node.statuses import EchoStatus, RejectReason, RejectResult, RejectSource

log = logging.getLogger(__name__)

QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only




def handle_conn_open(event: Event) -> None:
    """EVT_CONN_OPEN: disable Nagle's algorithm (small PDUs otherwise wait for delayed ACKs). (An A-ASSOCIATE-RQ
    whose AE title pynetdicom cannot decode gets its A-ASSOCIATE-RJ from dicom_node/transport.py.)"""
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
    """EVT_C_STORE: persist the dataset exactly as received (file meta + encoded bytes) and answer its status.

    With chunked receive on (:func:`dicom_node.scp.build_ae`) pynetdicom has written the request to a file
    (preamble, the file meta it builds from the request and context, the data set as received) and removes it
    after this handler returns; otherwise the same bytes are in memory."""
    context = event.context
    requestor = event.assoc.requestor
    incoming = IncomingInstance(
        data=_received(event),
        abstract_syntax=str(context.abstract_syntax),
        affected_sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
        transfer_syntax_uid=str(context.transfer_syntax),
        calling_ae=requestor.ae_title,
        peer_address=requestor.address,
    )
    return int(receiver.receive(incoming))


def _received(event: Event) -> bytes | Path:
    """The path of the file pynetdicom received the C-STORE data set to, else the encoded file in memory."""
    try:
        path = event.dataset_path  # None (or AttributeError) when chunked receive is off
    except AttributeError:
        path = None
    return Path(path) if path is not None else event.encoded_dataset(include_meta=True)


def handle_conn_close(event: Event) -> None:
    """EVT_CONN_CLOSE: remove the file of a C-STORE data set that was still being received.

    pynetdicom removes the file of a complete request after the C-STORE handler; when the connection drops (or
    is aborted) mid-data-set, the partial file is left in the temporary directory. See
    :func:`discard_partial_receive`."""
    discard_partial_receive(event.assoc)


def discard_partial_receive(assoc: Any) -> None:
    """Close and remove the partial chunked-receive file of *assoc*'s message in progress, if it has one.

    pynetdicom has no public way to reach that file: its DIMSE provider's message in progress (``dimse.message``)
    holds it as ``_data_set_file``/``_data_set_path`` (pynetdicom 2.x/3.x). Read defensively: should a later
    pynetdicom rename them, this does nothing (and tests/test_node_memory.py fails on the leftover file).
    """
    dimse = getattr(assoc, "dimse", None)
    message = getattr(dimse, "message", None)
    handle = getattr(message, "_data_set_file", None)
    path = getattr(message, "_data_set_path", None)
    if handle is None or path is None:
        return
    try:
        handle.close()
    except OSError as exc:
        log.warning("could not close a partial received file: %s", exc)
    try:
        Path(path).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove the partial received file %s: %s", path, exc)
        return
    log.info("connection from %s closed mid-data-set: its partial received file was removed",
             getattr(getattr(assoc, "requestor", None), "address", "?"))
