"""Ingest speed without loosening checks: no delayed-ACK stall per instance, one conversion pass per data set."""

from __future__ import annotations

import socket
import subprocess
import time
from io import BytesIO

import pydicom
import pytest
from node_helpers import PYDICOM_TEST_FILES, SCU_AE, make_ct, node_settings, running_node, wait_for
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.hooks import hooks
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import encode

from dicom_node.index import Index
from dicom_node.receive import IncomingInstance, InstanceReceiver, decode_all
from dicom_node.spool import Spool
from dicom_node.statuses import StoreStatus
from state.store import StateStore

DELAYED_ACK_S = 0.040  # Linux's minimum delayed-ACK time, which a Nagle-on client waits for once per instance
CHARSET_FILES = PYDICOM_TEST_FILES.parent / "charset_files"
# nested sequences, private elements, ambiguous VRs (US or SS, OB or OW), other character sets, implicit VR
DECODE_FILES = [PYDICOM_TEST_FILES / name for name in ("CT_small.dcm", "MR_small_implicit.dcm", "rtplan.dcm",
                                                       "waveform_ecg.dcm", "SC_rgb_jpeg_dcmtk.dcm")]
DECODE_FILES += [CHARSET_FILES / name for name in ("chrSQEncoding.dcm", "chrH31.dcm", "chrJapMulti.dcm")]


@pytest.fixture
def node(tmp_path):
    with running_node(node_settings(tmp_path / "home", study_idle_seconds=60)) as running:
        yield running


def test_storescu_with_nagle_on_is_not_held_by_a_delayed_ack_per_instance(node, tmp_path):
    """dcmtk storescu leaves Nagle on: without TCP_QUICKACK each instance waits >= 40 ms for our delayed ACK."""
    study, series, count = generate_uid(), generate_uid(), 25
    folder = tmp_path / "study"
    folder.mkdir()
    for number in range(count):
        make_ct(study, series, position=float(number), instance_number=number + 1).save_as(
            folder / f"{number:03d}.dcm", enforce_file_format=True)
    started = time.perf_counter()
    done = subprocess.run(["storescu", "+sd", "-aet", SCU_AE, "-aec", "RADDRAFT", "127.0.0.1", str(node.port),
                           str(folder)], check=False, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin"})  # no TCP_NODELAY in the environment: dcmtk's default
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert node.index.study_counts()[study] == (count, 1)
    assert seconds < count * DELAYED_ACK_S, f"{seconds:.2f} s for {count} instances: a delayed ACK per instance"


def test_server_socket_leaves_delayed_ack_mode_after_each_response(node):
    assoc = node.associate()
    assert assoc.is_established
    try:
        (server_assoc,) = wait_for(lambda: node.node._server.active_associations, what="server association")
        server_socket = server_assoc.dul.socket.socket
        for _ in range(3):
            assert assoc.send_c_store(make_ct()).Status == StoreStatus.SUCCESS
            # TCP_QUICKACK reads 1 when the socket is not in delayed-ACK ("pingpong") mode
            wait_for(lambda: server_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1, timeout=2,
                     what="quick-ACK mode after the C-STORE response")
    finally:
        assoc.release()


def test_accepted_sockets_have_tcp_nodelay(node):
    """Nagle's algorithm off on every accepted socket: our small response PDUs go out at once."""
    assoc = node.associate()
    assert assoc.is_established
    try:
        (server_assoc,) = wait_for(lambda: node.node._server.active_associations, what="server association")
        assert server_assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


def _converted_by(action, dataset: Dataset) -> set[tuple[int, str, int]]:
    """(tag, VR, value offset) of each raw element pydicom converts while *action(dataset)* runs (public hook)."""
    seen: set[tuple[int, str, int]] = set()
    default = hooks.raw_element_value

    def recording(raw: RawDataElement, data: dict, **kwargs) -> None:
        seen.add((int(raw.tag), str(data["VR"]), raw.value_tell))
        default(raw, data, **kwargs)

    hooks.register_callback("raw_element_value", recording)
    try:
        action(dataset)
    finally:
        hooks.register_callback("raw_element_value", default)
    return seen


def _iterate_all(dataset: Dataset) -> None:
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                _iterate_all(item)


@pytest.mark.parametrize("path", DECODE_FILES, ids=lambda path: path.name)
def test_decode_all_converts_every_element_that_iterating_the_dataset_converts(path):
    data = path.read_bytes()
    expected = _converted_by(_iterate_all, pydicom.dcmread(BytesIO(data)))
    assert expected
    assert _converted_by(decode_all, pydicom.dcmread(BytesIO(data))) == expected


def test_value_that_cannot_be_converted_inside_a_sequence_item_is_refused(tmp_path, caplog):
    """Only the full conversion pass reaches a nested element: a 3-byte US value there is CANNOT_UNDERSTAND."""
    ds = make_ct()
    item = Dataset()
    item.PatientID = "OTHER"
    item.add_new(0x00280010, "US", 1)  # Rows inside an item, re-encoded below with 3 bytes: not a whole US value
    ds.OtherPatientIDsSequence = Sequence([item])
    body = bytearray(encode(ds, False, True, False))
    at = body.find(b"\x28\x00\x10\x00US\x02\x00")
    body[at + 6:at + 8] = b"\x03\x00"
    body[at + 10:at + 10] = b"\x00"
    for length_at in (body.find(b"\x10\x00\x02\x10SQ") + 8, body.find(b"\xfe\xff\x00\xe0") + 4):  # grow SQ, item
        length = int.from_bytes(body[length_at:length_at + 4], "little")
        body[length_at:length_at + 4] = (length + 1).to_bytes(4, "little")
    meta = BytesIO()
    meta.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    data = meta.getvalue() + bytes(body)
    pydicom.dcmread(BytesIO(data))  # the file itself parses: the bad value is only met when converted

    spool = Spool(tmp_path / "spool")
    spool.ensure()
    store = StateStore(tmp_path / "index.sqlite")
    index = Index(store)
    receiver = InstanceReceiver(spool, index, 100, 0)
    incoming = IncomingInstance(data, CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, SCU_AE, "127.0.0.1")
    try:
        assert receiver.receive(incoming) == StoreStatus.CANNOT_UNDERSTAND
        assert index.count_instances() == 0
    finally:
        store.close()
    assert list(spool.tmp_dir.iterdir()) == [] and not any(spool.root.rglob("*.dcm"))
    assert any("cannot be decoded" in r.getMessage() and "(0028,0010)" in r.getMessage() for r in caplog.records)
