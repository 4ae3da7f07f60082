"""The shared real-peer fixtures themselves: each starts, answers, and is gone after the block."""

from __future__ import annotations

import socket
from pathlib import Path

import pydicom
import pytest

from peers import RedisServer, StoreSCP, port_is_open, wait_for

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def test_orthanc_stores_an_upload_and_sends_the_study_to_storescp(orthanc, dcmtk_storescp):
    answer = orthanc.upload(TEST_FILES / "CT_small.dcm")
    assert answer["Status"] == "Success"
    assert orthanc.studies() == [answer["ParentStudy"]]

    orthanc.add_modality("scp", dcmtk_storescp.aet, "127.0.0.1", dcmtk_storescp.port)
    job = orthanc.store_to("scp", orthanc.studies())

    assert job["InstancesCount"] == 1
    assert job["FailedInstancesCount"] == 0
    [received] = dcmtk_storescp.received()
    assert pydicom.dcmread(received).SOPInstanceUID == pydicom.dcmread(TEST_FILES / "CT_small.dcm").SOPInstanceUID


def test_redis_server_answers_and_stops(tmp_path):
    with RedisServer(tmp_path / "redis") as redis:
        assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
        with socket.create_connection(("127.0.0.1", redis.port), timeout=2) as sock:
            sock.sendall(b"SET k v\r\nGET k\r\n")
            replies = bytearray()

            def both_answered() -> bool:
                replies.extend(sock.recv(64))
                return replies == b"+OK\r\n$1\r\nv\r\n"

            wait_for(both_answered, timeout=5)
    assert not port_is_open(redis.port)


def test_the_fixture_uses_a_working_redis(redis_server):
    assert redis_server.ping()


def test_storescp_stops_when_the_block_ends(tmp_path):
    with StoreSCP(tmp_path / "scp") as scp:
        assert port_is_open(scp.port)
    assert not port_is_open(scp.port)


def test_wait_for_names_what_never_happened():
    with pytest.raises(TimeoutError, match=r"the sky falling not true after 0\.1 s"):
        wait_for(lambda: False, timeout=0.1, what="the sky falling")
