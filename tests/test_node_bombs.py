"""Compression bombs at the door: a deflated data set is inflated in bounded pieces before pydicom reads it.

Before: the node read every accepted instance with pydicom, which inflates a Deflated Explicit VR Little Endian
data set whole in memory: a 128 KiB C-STORE inflating to 128 MiB raised the node's memory by 128 MiB (a few
such associations take the gateway down). Now the node refuses it with 0xA700 (Out of Resources) when it would
exceed ``max_instance_mb`` inflated, holding at most one piece at a time; a real deflated file is stored as before.
"""

from __future__ import annotations

import subprocess
import tracemalloc

import pydicom
from node_helpers import PYDICOM_TEST_FILES, make_ct, node_settings, running_node, write_ct
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE

from dicom_node.statuses import StoreStatus

INFLATED = 128 * 1024 * 1024


def _storescu_deflated(node, path) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu proposing deflate: a peer in its own process, so this process measures only the node."""
    return subprocess.run(["storescu", "-v", "-xd", "-aet", "BOMBER", "-aec", node.settings.ae_title, "127.0.0.1",
                           str(node.port), str(path)], capture_output=True, text=True, timeout=120, check=False)


def test_a_deflate_bomb_is_refused_without_inflating_it(tmp_path):
    ds = make_ct()
    ds.Rows = ds.Columns = 8192
    ds.PixelData = bytes(INFLATED)  # zeros: deflate shrinks them about a thousand times
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    bomb = write_ct(tmp_path / "bomb.dcm", ds)
    del ds
    assert bomb.stat().st_size < 1024 * 1024
    with running_node(node_settings(tmp_path / "home", max_instance_mb=16)) as node:
        tracemalloc.start()
        try:
            done = _storescu_deflated(node, bomb)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert "Refused: OutOfResources" in done.stdout + done.stderr, done.stdout + done.stderr
        assert peak < 16 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB while refusing the bomb"
        assert node.index.count_instances() == 0


def test_a_real_deflated_instance_is_still_stored(tmp_path):
    real = PYDICOM_TEST_FILES / "image_dfl.dcm"
    with running_node(node_settings(tmp_path / "home")) as node:
        ae = AE(ae_title="SENDER")
        ds = pydicom.dcmread(real)
        ae.add_requested_context(ds.SOPClassUID, [DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
        try:
            assert assoc.send_c_store(real).Status == StoreStatus.SUCCESS
        finally:
            assoc.release()
        assert node.index.count_instances() == 1
