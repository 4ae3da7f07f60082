"""A disk that is really full: ``raddraft serve`` with its home on a small tmpfs, filled until the kernel says ENOSPC.

The server runs in its own mount namespace (``unshare``), so the tmpfs is private to it; this test reads and
changes its files through ``/proc/<pid>/root``. ``min_free_disk_mb`` is 0, so the free-space floor does not stand
in for the real thing. Two ways to be full: no data blocks left (instances fill the disk until the free-space
check refuses one; then, with one page left, a small instance passes that check, its staged file is written and
the SQLite WAL commit fails) and no inodes left (the staged file cannot be created). Either way the answer is Out
of Resources, nothing partial stays behind, and the server takes instances again as soon as there is space,
without a restart.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from node_helpers import Serve, make_ct, wait_for
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.statuses import StoreStatus

MOUNT_OPTIONS = {"blocks": "size=1024k", "inodes": "size=8m,nr_inodes=64"}
PAGE = 4096  # tmpfs allocates whole pages
BALLAST_BYTES = 64 * PAGE  # blocks: taken at the start, grown to fill the disk, freed at the end
FREE_INODES = 8  # inodes: left free after filling them all from outside (study + series directories + 6 files)
# pixel data of the instances that fill the disk until the free-space check refuses one
FILL_PIXEL_BYTES = {"blocks": 32 * 1024 + 2, "inodes": 1024}
KERNEL_SAYS = {"blocks": "database or disk is full", "inodes": "No space left on device"}


def _private_tmpfs_problem() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=64k probe /mnt"], check=False, capture_output=True, text=True)
    return None if probe.returncode == 0 else probe.stderr.strip()


def sized_ct(study: str, series: str, pixel_bytes: int, number: int) -> Dataset:
    ds = make_ct(study, series, instance_number=number, position=float(number))
    ds.Rows, ds.Columns = 1, pixel_bytes // 2
    ds.PixelData = os.urandom(pixel_bytes)
    return ds


def serve_on_tmpfs(home: Path, options: str) -> Serve:
    home.mkdir(parents=True)
    script = f'mount -t tmpfs -o {options} raddraft-full "$RADDRAFT_HOME" && exec "$@"'
    prefix = ("unshare", "--mount", "--map-root-user", "--propagation", "private", "sh", "-c", script, "sh")
    return Serve(home, "--no-worker", prefix=prefix, RADDRAFT_STUDY_IDLE_SECONDS="3600")


def take_space(inside: Path, resource: str) -> list[Path]:
    """Ballast the server does not know about, in its home; returned so it can be freed."""
    if resource == "blocks":
        ballast = inside / "ballast"
        ballast.write_bytes(bytes(BALLAST_BYTES))
        return [ballast]
    fillers: list[Path] = []
    while True:
        filler = inside / f"filler-{len(fillers)}"
        try:
            filler.touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            break
        fillers.append(filler)
    for filler in fillers[-FREE_INODES:]:
        filler.unlink()
    return fillers[:-FREE_INODES]


def leave_one_page(inside: Path, resource: str) -> None:
    """Blocks: grow the ballast until ENOSPC, then give back one page, so that a small instance passes the
    free-space check and its staged file is written, but the index commit after it finds no room."""
    if resource != "blocks":
        return
    ballast = inside / "ballast"
    with ballast.open("ab", buffering=0) as handle:
        try:
            while handle.write(bytes(PAGE)):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    pages = -(-ballast.stat().st_size // PAGE)
    os.truncate(ballast, (pages - 1) * PAGE)
    assert PAGE <= shutil.disk_usage(inside).free <= 2 * PAGE


@pytest.mark.parametrize("resource", ["blocks", "inodes"])
def test_full_disk_refuses_with_out_of_resources_keeps_every_accepted_instance_and_recovers(tmp_path, resource):
    problem = _private_tmpfs_problem()
    if problem:
        pytest.fail(f"the full-disk test needs a private tmpfs mount (unshare --mount): {problem}")
    home = tmp_path / "home"
    serve = serve_on_tmpfs(home, MOUNT_OPTIONS[resource])
    try:
        inside = Path(f"/proc/{serve.process.pid}/root") / home.relative_to("/")
        assert shutil.disk_usage(inside).total <= 8 * 1024 * 1024  # the server's home is the small tmpfs
        ballast = take_space(inside, resource)
        study, series = generate_uid(), generate_uid()
        accepted: list[str] = []
        refused: list[str] = []
        assoc = serve.associate()
        number = 0
        while True:  # fill the disk with instances until one is refused
            number += 1
            ds = sized_ct(study, series, FILL_PIXEL_BYTES[resource], number)
            status = assoc.send_c_store(ds).Status
            if status != StoreStatus.SUCCESS:
                assert status == StoreStatus.OUT_OF_RESOURCES, hex(status)
                refused.append(ds.SOPInstanceUID)
                break
            accepted.append(ds.SOPInstanceUID)
        assert len(accepted) >= 3, "".join(serve.log)

        # a small instance of the same series, then one of a new study: each passes the free-space check, meets
        # ENOSPC on its way to disk, and leaves nothing behind (not even the new study's directories)
        small = sized_ct(study, series, 2, number + 1)
        other = sized_ct(generate_uid(), generate_uid(), 2, 1)
        for ds in (small, other):
            leave_one_page(inside, resource)
            assert assoc.send_c_store(ds).Status == StoreStatus.OUT_OF_RESOURCES
            refused.append(ds.SOPInstanceUID)
            line = wait_for(lambda ds=ds: [x for x in serve.log if ds.SOPInstanceUID in x], timeout=10,
                            what="refusal logged")[0]
            assert "cannot persist the instance" in line and KERNEL_SAYS[resource] in line, line
        assert not (inside / "spool" / other.StudyInstanceUID).exists()
        assert assoc.is_established  # a refusal is a status, not an abort
        assoc.release()
        _assert_spool_matches_index(inside, tmp_path / "full", accepted, refused)

        for path in ballast:  # space again: the same server takes instances at once
            path.unlink()
        assoc = serve.associate()
        again = sized_ct(study, series, 1024, number + 2)
        assert assoc.send_c_store(again).Status == StoreStatus.SUCCESS
        assoc.release()
        _assert_spool_matches_index(inside, tmp_path / "freed", [*accepted, again.SOPInstanceUID], refused)
    finally:
        code = serve.stop()
    assert code == 0, "".join(serve.log)


def _snapshot(home: Path, folder: Path) -> Path:
    """A copy of the (idle) index and its WAL: SQLite would resolve ``/proc/<pid>/root`` to our own root."""
    folder.mkdir()
    for name in ("index.sqlite", "index.sqlite-wal"):
        if (home / name).exists():
            shutil.copyfile(home / name, folder / name)
    return folder / "index.sqlite"


def _assert_spool_matches_index(home: Path, snapshot: Path, accepted: list[str], refused: list[str]) -> None:
    """Every accepted instance is whole on disk and indexed; nothing else is (no temp files, no orphans)."""
    spool = home / "spool"
    db = sqlite3.connect(_snapshot(home, snapshot))
    try:
        rows = {sop: (path, digest, size) for sop, path, digest, size in
                db.execute("SELECT sop_instance_uid, path, sha256, size_bytes FROM instances")}
        received = db.execute("SELECT SUM(received) FROM episodes").fetchone()[0]
    finally:
        db.close()
    assert sorted(rows) == sorted(accepted)
    assert received == len(accepted)
    for path, digest, size in rows.values():
        data = (spool / path).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == digest, path
    assert list((spool / "tmp").iterdir()) == []
    stored = {p.relative_to(spool).as_posix() for p in spool.rglob("*") if p.is_file()}
    assert stored == {path for path, _, _ in rows.values()}
    assert not any(sop in name for sop in refused for name in stored)
