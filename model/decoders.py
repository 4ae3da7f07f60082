"""The pixel-data decoders raddraft uses, on top of pydicom 3's plugin selection.

pydicom tries the installed plugins of a transfer syntax in its own order and takes the first that decodes:

* JPEG Baseline 8-bit: pylibjpeg (libjpeg), then Pillow;
* JPEG Extended 12-bit: pylibjpeg, then Pillow (8-bit only), then raddraft's ``gdcm-12bit`` plugin below;
* JPEG Lossless (Process 14, SV1 too): pylibjpeg;
* JPEG-LS lossless and near-lossless: pylibjpeg, then pyjpegls (CharLS);
* JPEG 2000 lossless and lossy: pylibjpeg (openjpeg), then Pillow;
* HTJ2K: pylibjpeg (openjpeg); RLE Lossless: pylibjpeg-rle, then pydicom's own;
* native and Deflated Explicit VR Little Endian: pydicom itself.

Two changes to pydicom's defaults, made once by :func:`configure`:

1. pydicom's own ``gdcm`` plugin is removed from every decoder. With python-gdcm installed pydicom tries it first for
   every JPEG, JPEG-LS and JPEG 2000 syntax, and GDCM's native codecs crash the process (SIGSEGV on a corrupt JPEG,
   SIGABRT on a corrupt J2K header) where the other plugins raise: a worker killed that way would take the study
   back from the broker and die on it again at every restart.
2. ``gdcm-12bit`` decodes JPEG Extended 12-bit frames that libjpeg rejects (NEMA's NM1_JPLY, shipped by pydicom as
   JPEG-lossy.dcm: "scan start must be zero" in a sequential JPEG), as DCMTK and so Orthanc do; pydicom's gdcm plugin
   refuses 12-bit data although GDCM 3.2 decodes it (identical to DCMTK's dcmdjpeg). It runs GDCM in a child process
   (:mod:`model.gdcm_frame`) so that a crash there is a decoder error, not a dead worker.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import signal
import subprocess
import sys

from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import DecodeRunner
from pydicom.uid import (
    JPEG2000,
    UID,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

log = logging.getLogger(__name__)

GDCM_12BIT_PLUGIN = "gdcm-12bit"
GDCM_TIMEOUT_S = 60.0
# the syntaxes that pydicom gives a "gdcm" plugin
_PYDICOM_GDCM_SYNTAXES: tuple[UID, ...] = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
                                           JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000)

# pydicom's plugin interface: the dependencies named when the plugin is unavailable
DECODER_DEPENDENCIES: dict[str, tuple[str, ...]] = {JPEGExtended12Bit: ("python-gdcm>=3.2",)}

_configured = False

DEFAULT_MAX_DECODED_MB = 256.0
_limit = {"bytes": int(DEFAULT_MAX_DECODED_MB * 2**20)}


class DecodedTooLargeError(ValueError):
    """Decoding would hold more than the limit (a decompression bomb: a small file with a huge header size)."""


def limit_decoded_size(max_decoded_mb: float) -> None:
    """Set the process-wide limit that :func:`check_decoded_size` enforces (``RADDRAFT_MAX_DECODED_MB``)."""
    if max_decoded_mb <= 0:
        raise ValueError(f"max_decoded_mb must be > 0, got {max_decoded_mb}")
    _limit["bytes"] = int(max_decoded_mb * 2**20)


def decoded_size(rows: int, columns: int, frames: int = 1, samples: int = 1, bits_allocated: int = 16) -> int:
    """Bytes of *frames* decoded frames: rows x columns x frames x samples x bytes per sample."""
    return rows * columns * max(frames, 1) * max(samples, 1) * max(1, (bits_allocated + 7) // 8)


def check_decoded_size(ds: object, frames: int = 1, limit: int | None = None) -> int:
    """Raise :class:`DecodedTooLargeError` before a decode of *frames* frames of *ds* (a pydicom Dataset) would
    exceed *limit* bytes (by default the process-wide limit); the size is worked out from the header alone."""
    def number(keyword: str, default: int) -> int:
        try:
            return int(getattr(ds, keyword, default) or default)
        except (TypeError, ValueError):
            return default

    rows, columns = number("Rows", 0), number("Columns", 0)
    samples, bits = number("SamplesPerPixel", 1), number("BitsAllocated", 16)
    size = decoded_size(rows, columns, frames, samples, bits)
    bound = _limit["bytes"] if limit is None else limit
    if size > bound:
        raise DecodedTooLargeError(
            f"decoding would take {size / 2**20:.0f} MiB ({rows} x {columns} x {frames} frame(s) x {samples} "
            f"sample(s) x {max(1, (bits + 7) // 8)} byte(s)), over the limit of {bound / 2**20:.0f} MiB "
            "(RADDRAFT_MAX_DECODED_MB)")
    return size


def is_available(uid: str) -> bool:
    """pydicom's plugin interface: ``gdcm-12bit`` serves JPEG Extended when python-gdcm is installed."""
    return uid == JPEGExtended12Bit and importlib.util.find_spec("gdcm") is not None


def configure() -> None:
    """Remove pydicom's in-process gdcm plugin and add ``gdcm-12bit`` last for JPEG Extended (idempotent)."""
    global _configured  # noqa: PLW0603  (pydicom's decoders are process-wide; so is this switch)
    if _configured:
        return
    for syntax in _PYDICOM_GDCM_SYNTAXES:
        try:
            get_decoder(syntax).remove_plugin("gdcm")
        except ValueError:
            log.debug("pydicom has no gdcm plugin for %s", syntax.name)
    get_decoder(JPEGExtended12Bit).add_plugin(GDCM_12BIT_PLUGIN, (__name__, "decode_frame_with_gdcm"))
    _configured = True


def decode_frame_with_gdcm(src: bytes, runner: DecodeRunner) -> bytes:
    """pydicom's plugin interface: one encoded frame → its decoded bytes, decoded by GDCM in a child process."""
    geometry = {
        "rows": runner.rows, "columns": runner.columns, "samples_per_pixel": runner.samples_per_pixel,
        "planar_configuration": runner.planar_configuration if runner.samples_per_pixel > 1 else 0,
        "photometric_interpretation": str(runner.photometric_interpretation),
        "transfer_syntax": str(runner.transfer_syntax), "bits_allocated": runner.bits_allocated,
        "bits_stored": runner.bits_stored, "pixel_representation": runner.pixel_representation,
    }
    message = json.dumps(geometry).encode() + b"\n" + src
    try:
        done = subprocess.run([sys.executable, "-m", "model.gdcm_frame"], input=message, capture_output=True,
                              timeout=GDCM_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"GDCM did not decode the frame within {GDCM_TIMEOUT_S:.0f} s") from exc
    said = done.stderr.decode(errors="replace").strip()
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise RuntimeError(f"GDCM crashed ({name}) on the frame" + (f": {said.splitlines()[-1]}" if said else ""))
    if done.returncode != 0:
        raise RuntimeError(said.splitlines()[-1] if said else f"GDCM exited with status {done.returncode}")
    if said:
        log.debug("GDCM: %s", " / ".join(said.splitlines()))
    expected = runner.rows * runner.columns * runner.samples_per_pixel * (runner.bits_allocated // 8)
    if len(done.stdout) != expected:
        raise RuntimeError(f"GDCM returned {len(done.stdout)} bytes for a frame of {expected}")
    return done.stdout
