"""Source images as 8-bit PNG for the browser: model/imaging.py's decode and VOI windowing, nothing drawn.

Boxes and labels are drawn by the browser in SVG over the PNG (in source-pixel coordinates), so toggling
and zooming never re-renders the image. Renders are cached by (file, modification time, frame).
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread

from model.imaging import display_values

logger = logging.getLogger(__name__)

CACHE_ENTRIES = 32


class PngCache:
    """A small thread-safe LRU of rendered PNGs."""

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self._entries = entries
        self._data: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def render(self, path: Path, frame_number: int | None) -> bytes:
        """The PNG of one frame (1-based ``frame_number``, None for a single-frame image)."""
        key = (str(path), path.stat().st_mtime_ns, frame_number or 1)
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        png = render_png(path, frame_number)
        with self._lock:
            self._data[key] = png
            while len(self._data) > self._entries:
                self._data.popitem(last=False)
        return png


def render_png(path: Path, frame_number: int | None = None) -> bytes:
    """Decode, window (the dataset's VOI, else the modality default) and encode one frame as PNG."""
    dataset = dcmread(path)
    frames = int(dataset.get("NumberOfFrames") or 1)
    index = (frame_number or 1) - 1
    if not 0 <= index < frames:
        raise ValueError(f"frame_number {frame_number} must be in 1..{frames} for this image")
    display = display_values(dataset, index)  # (rows, cols) in [0, 1], bright = dense
    grey = np.clip(display * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(grey).save(out, format="PNG", optimize=False)
    logger.debug("rendered %dx%d PNG (frame %d)", grey.shape[1], grey.shape[0], index + 1)
    return out.getvalue()
