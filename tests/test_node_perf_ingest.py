"""Ingest speed without loosening what must be refused: no delayed-ACK stall per instance; the structure of every
data set and its sequences is checked, only the values the node reads are converted."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from node_helpers import PYDICOM_TEST_FILES, SCU_AE, make_ct, node_settings, running_node, wait_for, write_ct
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.hooks import hooks
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import encode

from dicom_node.index import Index
from dicom_node.receive import READ_ATTRIBUTES, IncomingInstance, InstanceReceiver, check_instance
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


READ_TAGS = {tag_for_keyword(keyword) for keyword in READ_ATTRIBUTES}


def _check_and_identify(path):
    def action(dataset: Dataset) -> None:
        check_instance(dataset, path.stat().st_size, UID(dataset.file_meta.TransferSyntaxUID), source=path)
    return action


def test_the_attributes_checked_at_the_door_include_every_one_the_manifest_reads():
    """workers/prepare.py builds the manifest from these: one that cannot be decoded must be refused at the door,
    not fail the study's episode (checked on its source: a keyword it reads that is not in READ_ATTRIBUTES)."""
    source = (Path(__file__).resolve().parents[1] / "workers" / "prepare.py").read_text()
    read = set(re.findall(r'(?:get\(|_int\(\w+, |_floats\(\w+, |_strings\(\w+, |text\()"([A-Z][A-Za-z]+)"', source))
    read |= set(re.findall(r"dataset\.([A-Z][A-Za-z]+)\b", source))
    nested = {"PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "PlanePositionSequence"}
    assert len(read) > 20
    assert read - nested - set(READ_ATTRIBUTES) == set()


@pytest.mark.parametrize("path", DECODE_FILES, ids=lambda path: path.name)
def test_the_check_parses_every_sequence_and_converts_only_what_the_node_reads(path):
    """Before: every element was converted (decode_all), a fifth of an association's time; now the sequences
    (their items' structure) and the attributes the node and the manifest read, nothing else."""
    converted = _converted_by(_check_and_identify(path), pydicom.dcmread(path, defer_size=1024 * 1024))
    everything = _converted_by(_iterate_all, pydicom.dcmread(path))
    sequences = {(tag, value_tell) for tag, vr, value_tell in everything if vr == "SQ"}
    parsed = {(tag, value_tell) for tag, vr, value_tell in converted if vr == "SQ"}
    assert sequences <= parsed, f"sequences not parsed: {sorted(hex(tag) for tag, _ in sequences - parsed)}"
    extra = {tag for tag, vr, _ in converted if vr != "SQ" and tag >> 16 != 0x0002} - READ_TAGS
    assert extra == set(), f"converted without need: {sorted(map(hex, extra))}"
    assert len(converted) < len(everything)


def _with_nested_rows(value_length: int, *, grow_containers: bool) -> tuple[Dataset, bytes]:
    """A CT whose Other Patient IDs Sequence item ends with Rows (US) encoded with *value_length* bytes: 3 bytes
    in the item (the item and sequence lengths grown to match) or the length field alone changed."""
    ds = make_ct()
    item = Dataset()
    item.PatientID = "OTHER"
    item.add_new(0x00280010, "US", 1)  # the last element of the item
    ds.OtherPatientIDsSequence = Sequence([item])
    body = bytearray(encode(ds, False, True, False))
    at = body.find(b"\x28\x00\x10\x00US\x02\x00")
    body[at + 6:at + 8] = value_length.to_bytes(2, "little")
    if grow_containers:
        body[at + 10:at + 10] = b"\x00" * (value_length - 2)
        for length_at in (body.find(b"\x10\x00\x02\x10SQ") + 8, body.find(b"\xfe\xff\x00\xe0") + 4):
            length = int.from_bytes(body[length_at:length_at + 4], "little")
            body[length_at:length_at + 4] = (length + value_length - 2).to_bytes(4, "little")
    meta = BytesIO()
    meta.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    return ds, meta.getvalue() + bytes(body)


def _receive(tmp_path, ds: Dataset, data: bytes) -> tuple[StoreStatus, Index, Spool, StateStore]:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    store = StateStore(tmp_path / "index.sqlite")
    index = Index(store)
    receiver = InstanceReceiver(spool, index, 100, 0)
    incoming = IncomingInstance(data, CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, SCU_AE, "127.0.0.1")
    return receiver.receive(incoming), index, spool, store


def test_a_sequence_item_that_cannot_be_parsed_is_refused(tmp_path, caplog):
    """Rows, the last element of a sequence item, announces 4 bytes where the item holds 2: the item's structure
    is broken (the data set cannot be parsed), whatever the element's value: CANNOT_UNDERSTAND, nothing stored."""
    ds, data = _with_nested_rows(4, grow_containers=False)
    status, index, spool, store = _receive(tmp_path, ds, data)
    try:
        assert status == StoreStatus.CANNOT_UNDERSTAND
        assert index.count_instances() == 0
    finally:
        store.close()
    assert list(spool.tmp_dir.iterdir()) == [] and not any(spool.root.rglob("*.dcm"))
    assert any("cannot be decoded" in r.getMessage() and "(0028,0010)" in r.getMessage() for r in caplog.records)


def test_a_value_the_node_does_not_read_is_stored_as_received(tmp_path):
    """A well-formed item holding a 3-byte US (not a whole value): the node does not read it, so it does not
    convert it; the instance is stored byte for byte (before: refused, after converting every element)."""
    ds, data = _with_nested_rows(3, grow_containers=True)
    pydicom.dcmread(BytesIO(data))  # the file itself parses: the bad value is only met when converted
    status, index, spool, store = _receive(tmp_path, ds, data)
    try:
        assert status == StoreStatus.SUCCESS
        record = index.instance(ds.SOPInstanceUID)
        assert record is not None
        assert (spool.root / record.path).read_bytes() == data
    finally:
        store.close()


def test_associations_parse_their_data_sets_one_at_a_time(tmp_path):
    """PARSING_GATE (dicom_node/receive.py): the first thread to convert an element waits up to 2 s for a second
    thread to convert one too; with the gate the second cannot until the first is done (before: at once)."""
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    store = StateStore(tmp_path / "index.sqlite")
    receiver = InstanceReceiver(spool, Index(store), 100, 0)
    study = generate_uid()
    incoming = []
    for number in range(2):
        ds = make_ct(study, instance_number=number + 1)
        path = write_ct(tmp_path / f"{number}.dcm", ds)
        incoming.append(IncomingInstance(path, CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian, SCU_AE,
                                         "127.0.0.1"))
    seen: list[int] = []
    lock, second, overlapped = threading.Lock(), threading.Event(), []
    default = hooks.raw_element_value

    def recording(raw: RawDataElement, data: dict, **kwargs) -> None:
        me = threading.get_ident()
        with lock:
            first = not seen
            if me not in seen:
                seen.append(me)
            if len(seen) > 1:
                second.set()
        if first:
            overlapped.append(second.wait(2.0))
        default(raw, data, **kwargs)

    hooks.register_callback("raw_element_value", recording)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            statuses = list(pool.map(receiver.receive, incoming))
    finally:
        hooks.register_callback("raw_element_value", default)
        store.close()
    assert statuses == [StoreStatus.SUCCESS, StoreStatus.SUCCESS]
    assert len(seen) == 2
    assert overlapped == [False], "a second data set was parsed while the first one was"
