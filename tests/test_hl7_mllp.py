"""MLLP client against a real listener on loopback: ACK codes, MSA-2 check, timeouts, reconnects."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from hl7_samples import ENDPOINTS, make_manifest, make_result

from core.settings import HL7Destination, Settings, load_settings
from peers import free_port
from peers.mllp import AckMode, MLLPListener
from reporting.hl7_oru import ResultStatus, build_oru_r01, new_control_id, oru_r01_from_settings
from reporting.mllp import (
    HL7NegativeAck,
    MLLPClient,
    MLLPConnectionError,
    MLLPProtocolError,
    MLLPTimeoutError,
    deliver,
    frame,
    message_control_id,
)


def oru(control_id: str = "M1") -> bytes:
    return build_oru_r01(make_manifest(patient_name="Müller-Lüdenscheidt^A&B"), make_result(),
                         ResultStatus.PRELIMINARY, endpoints=ENDPOINTS, control_id=control_id,
                         message_time=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC))


@pytest.fixture
def listener() -> Iterator[MLLPListener]:
    with MLLPListener() as running:
        yield running


def test_aa_is_delivered_and_listener_gets_the_message(listener: MLLPListener) -> None:
    message = oru("M1")
    with MLLPClient(listener.host, listener.port, ack_timeout=5) as client:
        ack = client.send(message)
        assert (ack.code, ack.control_id) == ("AA", "M1")
        ack2 = client.send(oru("M2"))
        assert ack2.control_id == "M2"
    received = listener.wait_for_messages(2)
    assert listener.raw[0] == message
    assert received[0]["PID.F5.R1.C1"] == "Müller-Lüdenscheidt"
    assert received[0]["PID.F5.R1.C2"] == "A&B"
    assert [m["MSH.F10"] for m in received] == ["M1", "M2"]
    assert listener.connections_accepted == 1  # one connection for both messages


def test_ae_carries_the_peers_reason(listener: MLLPListener) -> None:
    listener.mode, listener.reason = AckMode.AE, "Unknown patient | id ^ 42"
    with MLLPClient(listener.host, listener.port, ack_timeout=5) as client:
        with pytest.raises(HL7NegativeAck, match=r"answered AE to message M1: Unknown patient \| id \^ 42") as err:
            client.send(oru("M1"))
        assert err.value.ack_code == "AE"
        assert err.value.reason == "Unknown patient | id ^ 42"
        assert not err.value.transient
        listener.mode = AckMode.AA
        assert client.send(oru("M2")).code == "AA"


def test_ar_is_a_negative_ack(listener: MLLPListener) -> None:
    listener.mode = AckMode.AR
    with MLLPClient(listener.host, listener.port, ack_timeout=5) as client, \
            pytest.raises(HL7NegativeAck, match="answered AR to message M1: no reason given") as err:
        client.send(oru("M1"))
    assert err.value.ack_code == "AR"
    assert err.value.reason == ""


def test_wrong_msa_2_is_an_error(listener: MLLPListener) -> None:
    listener.mode = AckMode.WRONG_CONTROL_ID
    with MLLPClient(listener.host, listener.port, ack_timeout=5) as client, \
            pytest.raises(MLLPProtocolError, match=r"acknowledges message 'NOT-M1' \(MSA-2\), not 'M1'"):
        client.send(oru("M1"))


def test_garbage_answer_is_a_protocol_error(listener: MLLPListener) -> None:
    listener.mode = AckMode.GARBAGE
    with MLLPClient(listener.host, listener.port, ack_timeout=5) as client, \
            pytest.raises(MLLPProtocolError, match="not an HL7 ACK"):
        client.send(oru("M1"))


def test_listener_down_is_a_connection_error_naming_host_and_port() -> None:
    port = free_port()
    with pytest.raises(MLLPConnectionError, match=f"cannot connect to HL7 destination 127.0.0.1:{port}") as err:
        MLLPClient("127.0.0.1", port, connect_timeout=2).send(oru())
    assert err.value.transient
    assert err.value.destination == f"127.0.0.1:{port}"


def test_close_without_answer_is_an_error(listener: MLLPListener) -> None:
    listener.mode = AckMode.CLOSE
    with MLLPClient(listener.host, listener.port, ack_timeout=5) as client:
        with pytest.raises(MLLPConnectionError, match="closed the connection without an ACK for message M1"):
            client.send(oru("M1"))
        assert not client.connected
    assert len(listener.wait_for_messages(1)) == 1


def test_hanging_listener_times_out(listener: MLLPListener) -> None:
    listener.mode = AckMode.NO_ANSWER
    with MLLPClient(listener.host, listener.port, ack_timeout=0.5) as client:
        with pytest.raises(MLLPTimeoutError, match=r"no ACK from HL7 destination 127.0.0.1:\d+ for message M1 "
                                                    r"within 0.5 s"):
            client.send(oru("M1"))
        assert not client.connected
        # after a timeout the next message goes on a new connection and is not confused with the old one
        listener.mode = AckMode.AA
        assert client.send(oru("M2")).control_id == "M2"
    assert listener.connections_accepted == 2


def test_reconnects_after_listener_restarts_on_the_same_port() -> None:
    first = MLLPListener().start()
    port = first.port
    client = MLLPClient("127.0.0.1", port, ack_timeout=5)
    try:
        assert client.send(oru("M1")).code == "AA"
        first.stop()
        with pytest.raises(MLLPConnectionError, match=f"127.0.0.1:{port}"):
            client.send(oru("M2"))  # nobody listens now: a clear error, and nothing pretends to be delivered
        with MLLPListener(port=port) as second:
            assert client.send(oru("M2")).code == "AA"
            assert [m["MSH.F10"] for m in second.wait_for_messages(1)] == ["M2"]
    finally:
        client.close()


def test_reconnects_when_the_idle_connection_was_dropped() -> None:
    first = MLLPListener().start()
    client = MLLPClient("127.0.0.1", first.port, ack_timeout=5)
    try:
        assert client.send(oru("M1")).code == "AA"
        assert client.connected
        first.stop()
        with MLLPListener(port=first.port) as second:
            assert client.send(oru("M2")).code == "AA"  # the old, closed connection is replaced transparently
            assert second.wait_for_messages(1)[0]["MSH.F10"] == "M2"
    finally:
        client.close()


def test_deliver_uses_a_configured_destination(listener: MLLPListener) -> None:
    settings = Settings(hl7_destinations=f"{listener.host}:{listener.port}", network_timeout_s=5)
    (destination,) = settings.hl7_destinations
    assert isinstance(destination, HL7Destination)
    control_id = new_control_id()
    assert deliver(oru(control_id), destination, settings).control_id == control_id


def test_destinations_and_receiver_from_the_environment_get_aa_then_ae(
    listener: MLLPListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RADDRAFT_HL7_DESTINATIONS + receiving application/facility as ``raddraft serve`` loads them; the listener
    first accepts (AA), then rejects (AE) with a reason the sender reports."""
    monkeypatch.setenv("RADDRAFT_HL7_DESTINATIONS", listener.address)
    monkeypatch.setenv("RADDRAFT_HL7_SENDING_FACILITY", "RAD & CO")
    monkeypatch.setenv("RADDRAFT_HL7_RECEIVING_APPLICATION", "EPIC^RIS")
    monkeypatch.setenv("RADDRAFT_HL7_RECEIVING_FACILITY", "WARD 7")
    monkeypatch.setenv("RADDRAFT_NETWORK_TIMEOUT_S", "5")
    settings = load_settings()
    (destination,) = settings.hl7_destinations
    assert (destination.host, destination.port) == (listener.host, listener.port)

    def message(control_id: str) -> bytes:
        return oru_r01_from_settings(make_manifest(), make_result(), ResultStatus.PRELIMINARY, settings=settings,
                                     control_id=control_id, message_time=datetime(2024, 1, 2, tzinfo=UTC))

    assert deliver(message("FIRST"), destination, settings).code == "AA"
    listener.mode, listener.reason = AckMode.AE, "Order ACC^001 unknown & closed"
    with pytest.raises(HL7NegativeAck, match=r"answered AE to message SECOND: Order ACC\^001 unknown & closed"):
        deliver(message("SECOND"), destination, settings)
    first, second = listener.wait_for_messages(2)
    assert [first["MSH.F10"], second["MSH.F10"]] == ["FIRST", "SECOND"]
    assert (first["MSH.F4"], first["MSH.F5"], first["MSH.F6"]) == ("RAD & CO", "EPIC^RIS", "WARD 7")
    assert first["OBR.F25"] == "P"


def test_framing_and_control_id_extraction() -> None:
    assert frame(b"MSH|x") == b"\x0bMSH|x\x1c\r"
    with pytest.raises(ValueError, match="MLLP block character"):
        frame(b"MSH|\x1c")
    assert message_control_id(oru("ABC")) == "ABC"
    with pytest.raises(ValueError, match="must start with an MSH segment"):
        message_control_id(b"PID|1")
    with pytest.raises(ValueError, match="no MSH-10"):
        message_control_id(b"MSH|^~\\&|A|B|C|D|20240101||ORU^R01||P|2.5.1\r")
