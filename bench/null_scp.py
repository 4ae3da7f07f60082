"""A pynetdicom storage SCP that stores nothing: the ceiling of any C-STORE handler on pynetdicom (bench.ingest).

Configured as raddraft's node is (dicom_node/scp.py and handlers.py: chunked receive, 1 MiB PDUs, every storage
SOP class and transfer syntax, TCP_NODELAY on accepted sockets and TCP_QUICKACK after each send), but its C-STORE
handler only appends one byte to ``COUNT_FILE`` (no fsync) and answers Success. What raddraft adds on top of it
is its own cost; what this one costs is pynetdicom's (its DUL and association reactors poll with 1 ms sleeps).

Run: ``python -m bench.null_scp PORT COUNT_FILE``; stops on SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

log = logging.getLogger("bench.null_scp")

AE_TITLE = "NULLSCP"
MAXIMUM_PDU_SIZE = 1024 * 1024  # as dicom_node/scp.py
QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def main(argv: list[str]) -> int:
    port, count_file = int(argv[0]), Path(argv[1])
    _config.STORE_RECV_CHUNKED_DATASET = True  # as dicom_node/scp.py: the data set is written to a file
    counted = count_file.open("ab", buffering=0)
    lock = threading.Lock()

    def on_store(event: Event) -> int:
        with lock:
            counted.write(b".")
        return 0x0000

    def on_open(event: Event) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_sent(event: Event) -> None:
        transport = event.assoc.dul.socket
        if transport is not None and transport.socket is not None and QUICKACK is not None:
            transport.socket.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)

    ae = AE(ae_title=AE_TITLE)
    ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
    ae.maximum_associations = 64
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open), (evt.EVT_DATA_SENT, on_sent)])
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("null SCP %s on port %d", AE_TITLE, port)
    stop.wait()
    server.shutdown()
    counted.close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main(sys.argv[1:]))
