"""Decoding the picked slices of an instance, in a child process with a memory limit.

The header check (``RADDRAFT_MAX_DECODED_MB``, workers/gate.py) keeps announced bombs out, but a decoder can still
be asked for more than the header says (a JPEG or JPEG 2000 code stream whose own header announces a larger
image than the DICOM attributes) or need more than expected. With the embedded broker the prepare stage runs
inside ``raddraft serve``: an out-of-memory kill there would take the DICOM node and the worklist down. So the
decode runs in one spawned child process that this module keeps, whose address space is capped
(``RLIMIT_AS``) at what it needed after start-up plus ``RADDRAFT_DECODE_MEMORY_MB``: a decode that needs more gets
``MemoryError`` there (or the child dies) and the instance is "not decodable" with that reason; the gateway goes
on. The child imports only the imaging code (no torch), so starting it takes well under a second.
"""

from __future__ import annotations

import logging
import resource
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

from pydicom import dcmread

from model.imaging import ImageDecodeError, PreparedImage, prepare_frames, prepare_image, read_header
from model.slices import SliceRef

log = logging.getLogger(__name__)

DECODE_TIMEOUT_S = 600.0


def prepare_slices(path: Path, picks: Sequence[SliceRef], model_size: int) -> list[PreparedImage]:
    """The model inputs of the picked slices of one instance: a single-frame image read whole, the picked frames of
    a multi-frame image read one by one from its file (a large enhanced series is never held whole)."""
    if picks[0].frame_number is None:
        return [prepare_image(dcmread(path), model_size)]
    return prepare_frames(path, read_header(path), [picked.frame_index for picked in picks], model_size)


def _virtual_size() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmSize line")


def _limit_child(budget: int) -> None:
    """Initializer of the child: cap its address space at its size after start-up plus *budget* bytes."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _virtual_size() + budget
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


class IsolatedDecoder:
    """:func:`prepare_slices` run in a child process capped at *budget_mb* MiB beyond its start-up size; the child
    is started on first use and again after one died."""

    def __init__(self, budget_mb: float) -> None:
        self.budget = int(budget_mb * 2**20)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def __call__(self, path: Path, picks: Sequence[SliceRef], model_size: int) -> list[PreparedImage]:
        with self._lock:  # one decode at a time: the budget is the child's, not per call
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"),
                                                 initializer=_limit_child, initargs=(self.budget,))
            try:
                return self._pool.submit(prepare_slices, path, list(picks), model_size).result(DECODE_TIMEOUT_S)
            except MemoryError as exc:
                raise ImageDecodeError(f"decoding needs more than RADDRAFT_DECODE_MEMORY_MB "
                                       f"{self.budget / 2**20:.0f} MiB") from exc
            except BrokenProcessPool as exc:
                self._pool = None
                log.warning("the decoding process died while decoding %s; it is started again", path.name)
                raise ImageDecodeError("the decoding process died (out of memory or killed) while decoding it"
                                       ) from exc

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None


_decoders: dict[int, IsolatedDecoder] = {}
_decoders_lock = threading.Lock()


def isolated_decoder(budget_mb: float) -> IsolatedDecoder:
    """The process's decoder for *budget_mb* (one child per budget, kept for the life of the process)."""
    key = int(budget_mb * 2**20)
    with _decoders_lock:
        if key not in _decoders:
            _decoders[key] = IsolatedDecoder(budget_mb)
        return _decoders[key]
