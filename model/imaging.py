"""Image preparation shared by every caller of the model: DICOM pixels → display values → model input.

The steps, in order (PS3.3 C.11 "grayscale pipeline"):

1. decode one frame of any transfer syntax with pydicom's pixel decoders (the installed pylibjpeg, openjpeg,
   libjpeg, rle and pyjpegls plugins; pillow for baseline JPEG; GDCM in a child process for the 12-bit JPEG that
   libjpeg rejects), as :mod:`model.decoders` sets them up; the frames a caller picks of a multi-frame file are
   read from the file one by one (:func:`prepare_frames`), never all of its pixel data at once;
2. colour images (RGB, YBR_*, PALETTE COLOR) become luminance; grayscale images get the Modality LUT
   (Rescale Slope/Intercept or a Modality LUT Sequence; of an enhanced multi-frame image, the frame's own from its
   functional groups: :func:`frame_header`);
3. the VOI transform: the dataset's VOI LUT Sequence, else its first Window Center/Width (LINEAR, LINEAR_EXACT
   or SIGMOID), else a modality default (CT: lung window for chest studies, soft-tissue window otherwise;
   everything else: the 0.5–99.5 percentile window of the image);
4. MONOCHROME1 is inverted so that bright always means dense;
5. letterbox to the model's square input: bicubic resize of the long side to the model size, keeping the
   aspect ratio, centred on a black square; the gray image is copied to 3 channels and CLIP-normalised.

The :class:`Letterbox` transform is kept with the tensor so that a box on the model's 0–100 grid maps back to
source pixels and back again. Source-pixel coordinates are DICOM image coordinates: x = column, y = row, the
top-left corner of the top-left pixel is (0, 0) and its centre is (0.5, 0.5), so a box that tightly holds the
pixels of columns a..b and rows c..d is (a, c, b + 1, d + 1).

The report (and VQA) input of a series is its *study view* (:func:`study_view`), the same in training, analysis
and evaluation: the single image of a radiograph; for a chest CT series the maximum-intensity projection of the
analysed slices (as a radiologist slabs a chest CT to find nodules: a nodule of any slice stays a bright spot at
full resolution, so it can be seen, counted and sided); for an MR series (or slices of different sizes) a montage
of the analysed slices (``ceil(sqrt(n))`` columns, each slice letterboxed into its tile, head first).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing, get_decoder, iter_pixels
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from model import decoders

log = logging.getLogger(__name__)
decoders.configure()

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
GRID = 100  # boxes in model text are integers on a 0–100 grid over the square model input

CT_LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)  # (center, width) in HU
CT_SOFT_TISSUE_WINDOW: tuple[float, float] = (40.0, 400.0)
PERCENTILE_WINDOW: tuple[float, float] = (0.5, 99.5)
_CHEST_WORDS = ("CHEST", "THORAX", "LUNG", "THORAC")

# SOP classes that carry pixel data but are not images a radiologist reads (masks, dose grids).
NON_IMAGE_PIXEL_SOP_CLASSES: frozenset[str] = frozenset({
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose Storage
})

Box = tuple[float, float, float, float]

# Functional group macros (PS3.3 C.7.6.16) whose attributes a frame's pixels need, lifted to the top level by
# frame_header: rescale, window, plane position and orientation, pixel spacing.
FRAME_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence", "PlanePositionSequence",
                "PlaneOrientationSequence", "PixelMeasuresSequence")
_NOT_OF_A_FRAME = frozenset({Tag("PixelData"), Tag("SharedFunctionalGroupsSequence"),
                             Tag("PerFrameFunctionalGroupsSequence")})
HEADER_DEFER_SIZE = "64 KB"  # a multi-frame file's header is read with its pixel data left in the file


class ImageDecodeError(ValueError):
    """The pixel data of an instance cannot be decoded (unsupported transfer syntax, missing plugin, corrupt)."""


class NotAnImageError(ValueError):
    """The instance is not an image (a structured report, a presentation state, a segmentation …)."""


@dataclass(frozen=True)
class Letterbox:
    """Where a ``source_rows × source_cols`` image lies inside the ``model_size`` square model input.

    ``scale`` is model pixels per source pixel along the long side; the short side is rounded to whole model
    pixels, so each axis uses its own exact factor (``resized / source``) in the mappings below.
    """

    source_rows: int
    source_cols: int
    model_size: int

    def __post_init__(self) -> None:
        if self.source_rows < 1 or self.source_cols < 1:
            raise ValueError(f"source size {self.source_rows}x{self.source_cols} must be at least 1x1 pixels")
        if self.model_size < 1:
            raise ValueError(f"model_size {self.model_size} must be at least 1")

    @property
    def scale(self) -> float:
        return self.model_size / max(self.source_rows, self.source_cols)

    @property
    def resized_cols(self) -> int:
        return max(1, min(self.model_size, round(self.source_cols * self.scale)))

    @property
    def resized_rows(self) -> int:
        return max(1, min(self.model_size, round(self.source_rows * self.scale)))

    @property
    def pad_x(self) -> int:
        """Black model columns left of the image."""
        return (self.model_size - self.resized_cols) // 2

    @property
    def pad_y(self) -> int:
        """Black model rows above the image."""
        return (self.model_size - self.resized_rows) // 2

    def source_to_model(self, x: float, y: float) -> tuple[float, float]:
        """Source pixel coordinates → model pixel coordinates (continuous)."""
        return (self.pad_x + x * self.resized_cols / self.source_cols,
                self.pad_y + y * self.resized_rows / self.source_rows)

    def model_to_source(self, x: float, y: float) -> tuple[float, float]:
        """Model pixel coordinates → source pixel coordinates (continuous, not clipped)."""
        return ((x - self.pad_x) * self.source_cols / self.resized_cols,
                (y - self.pad_y) * self.source_rows / self.resized_rows)

    def grid_to_source(self, box: tuple[float, float, float, float]) -> Box:
        """A (x1, y1, x2, y2) box on the 0–100 model grid → source pixels, clipped to the image."""
        _check_box(box, 0, GRID, "grid box")
        unit = self.model_size / GRID
        x1, y1 = self.model_to_source(box[0] * unit, box[1] * unit)
        x2, y2 = self.model_to_source(box[2] * unit, box[3] * unit)
        return (min(max(x1, 0.0), self.source_cols), min(max(y1, 0.0), self.source_rows),
                min(max(x2, 0.0), self.source_cols), min(max(y2, 0.0), self.source_rows))

    def source_to_grid(self, box: Box) -> tuple[int, int, int, int]:
        """A source-pixel box → integers on the 0–100 model grid (used to write training targets)."""
        _check_box(box, 0, max(self.source_cols, self.source_rows), "source box")
        if box[2] > self.source_cols or box[3] > self.source_rows:
            raise ValueError(f"source box {box} exceeds the image of {self.source_cols} columns x "
                             f"{self.source_rows} rows")
        unit = self.model_size / GRID
        mx1, my1 = self.source_to_model(box[0], box[1])
        mx2, my2 = self.source_to_model(box[2], box[3])
        return (round(mx1 / unit), round(my1 / unit), round(mx2 / unit), round(my2 / unit))


def _check_box(box: tuple[float, ...], low: float, high: float, what: str) -> None:
    if len(box) != 4:
        raise ValueError(f"{what} {box} must have 4 values (x1, y1, x2, y2)")
    x1, y1, x2, y2 = box
    if not (low <= x1 <= x2 <= high and low <= y1 <= y2 <= high):
        raise ValueError(f"{what} {box} must satisfy {low} <= x1 <= x2 <= {high} and {low} <= y1 <= y2 <= {high}")


@dataclass(frozen=True)
class PreparedImage:
    """The model input of one frame and how it maps back to the source image."""

    pixels: np.ndarray  # (3, S, S) float32, CLIP-normalised
    transform: Letterbox
    display: np.ndarray  # (rows, cols) float32 in [0, 1], bright = dense


def decode_frame(ds: Dataset, frame: int = 0) -> tuple[np.ndarray, str]:
    """The stored values of one frame and the photometric interpretation they are in after decoding.

    Colour images come back as (rows, cols, 3) RGB (YBR is converted); grayscale as (rows, cols).
    """
    _require_image(ds)
    syntax = _transfer_syntax(ds)
    decoder = _decoder_for(syntax)
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as exc:
        raise ImageDecodeError(f"Number of Frames (0028,0008) is not an integer: {exc}") from exc
    if not 0 <= frame < frames:
        raise ValueError(f"frame index {frame} is outside the {frames} frame(s) of the image")
    try:
        decoders.check_decoded_size(ds, 1)
    except decoders.DecodedTooLargeError as exc:
        raise ImageDecodeError(str(exc)) from exc
    try:
        array, meta = decoder.as_array(ds, index=frame)
    except Exception as exc:  # each plugin raises its own types; all mean "cannot decode these bytes"
        raise ImageDecodeError(f"pixel data in transfer syntax {syntax} ({syntax.name}) cannot be decoded: {exc}"
                               ) from exc
    photometric = str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))
    return array, photometric


def frame_header(ds: Dataset, frame: int = 0) -> Dataset:
    """The attributes of frame *frame* (0-based) of an enhanced multi-frame image as a single-frame image has them:
    the top-level attributes (no pixel data) with those of the :data:`FRAME_MACROS` of the Shared Functional Groups
    Sequence, then of the frame's item of the Per-frame Functional Groups Sequence (which wins), at the top level.
    *ds* itself when it has no functional groups (a classic image, a legacy multi-frame one)."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not shared and not per_frame:
        return ds
    if per_frame and not 0 <= frame < len(per_frame):
        raise ValueError(f"frame index {frame} is outside the {len(per_frame)} items of the Per-frame Functional "
                         "Groups Sequence")
    header = Dataset()
    for tag in sorted(ds.keys()):  # by tag: iterating the data set would read a pixel data value left in the file
        if tag not in _NOT_OF_A_FRAME:
            header.add(ds[tag])
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    for groups in (shared[0] if shared else None, per_frame[frame] if per_frame else None):
        if groups is None:
            continue
        for macro in FRAME_MACROS:
            items = groups.get(macro)
            if items:
                for element in items[0]:
                    header.add(element)
    return header


def display_values(
    ds: Dataset, frame: int = 0, *, window: tuple[float, float] | None = None
) -> np.ndarray:
    """One frame as float32 display values in [0, 1] (bright = dense), MONOCHROME1 already inverted.

    *window* (center, width) overrides the dataset's VOI transform and the modality default.
    """
    stored, photometric = decode_frame(ds, frame)
    return _display(stored, photometric, frame_header(ds, frame), window)


def _display(stored: np.ndarray, photometric: str, ds: Dataset, window: tuple[float, float] | None) -> np.ndarray:
    """Display values of decoded stored values; *ds* holds the frame's LUT attributes (:func:`frame_header`)."""
    if photometric == "PALETTE COLOR":
        stored = apply_color_lut(stored, ds)
        photometric = "RGB"
    if stored.ndim == 3:
        return _luminance(stored, photometric)
    values = apply_modality_lut(stored, ds).astype(np.float64, copy=False)
    if window is not None:
        shown = _window(values, *window, "LINEAR")
    elif ds.get("VOILUTSequence"):
        shown = _voi_lut(values, ds)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        shown = _dataset_window(values, ds)
    else:
        shown = _default_window(values, ds)
    if photometric == "MONOCHROME1":
        shown = 1.0 - shown
    return shown.astype(np.float32)


def letterbox(display: np.ndarray, model_size: int) -> tuple[np.ndarray, Letterbox]:
    """Bicubic-resize a (rows, cols) [0, 1] image into a black ``model_size`` square, keeping its aspect ratio."""
    if display.ndim != 2:
        raise ValueError(f"display image must be 2-D (rows, cols), got shape {display.shape}")
    transform = Letterbox(display.shape[0], display.shape[1], model_size)
    resized = Image.fromarray(np.ascontiguousarray(display, dtype=np.float32), mode="F").resize(
        (transform.resized_cols, transform.resized_rows), Image.Resampling.BICUBIC
    )
    square = np.zeros((model_size, model_size), dtype=np.float32)
    square[transform.pad_y:transform.pad_y + transform.resized_rows,
           transform.pad_x:transform.pad_x + transform.resized_cols] = np.clip(np.asarray(resized), 0.0, 1.0)
    return square, transform


def normalise(square: np.ndarray) -> np.ndarray:
    """(S, S) gray in [0, 1] → (3, S, S) float32 with CLIP mean/std per channel."""
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]
    return (square[None, :, :] - mean) / std


def prepare_display(display: np.ndarray, model_size: int) -> PreparedImage:
    """Model input from display values already in [0, 1] (phantoms in memory, tests)."""
    square, transform = letterbox(display, model_size)
    return PreparedImage(pixels=normalise(square), transform=transform, display=display)


def prepare_image(
    ds: Dataset, model_size: int, frame: int = 0, *, window: tuple[float, float] | None = None
) -> PreparedImage:
    """Decode, window and letterbox one frame of *ds* for a model with a ``model_size`` square input."""
    return prepare_display(display_values(ds, frame, window=window), model_size)


def overview(displays: Sequence[np.ndarray], model_size: int) -> np.ndarray:
    """(3, S, S) model input showing every display image: itself when one, else a montage of tiles."""
    if not displays:
        raise ValueError("overview needs at least one image")
    columns = math.ceil(math.sqrt(len(displays)))
    rows = math.ceil(len(displays) / columns)
    tile = model_size // max(columns, rows)
    square = np.zeros((model_size, model_size), dtype=np.float32)
    top = (model_size - rows * tile) // 2
    left = (model_size - columns * tile) // 2
    for i, display in enumerate(displays):
        small, _ = letterbox(display, tile)
        r, c = divmod(i, columns)
        square[top + r * tile: top + (r + 1) * tile, left + c * tile: left + (c + 1) * tile] = small
    return normalise(square)


def projects(modality: str | None, prepared: Sequence[PreparedImage]) -> bool:
    """Whether the study view of these slices is their maximum-intensity projection (CT slices of one size)."""
    return modality == "CT" and len(prepared) > 1 and len({p.display.shape for p in prepared}) == 1


def study_view(prepared: Sequence[PreparedImage], modality: str | None, model_size: int) -> np.ndarray:
    """(3, S, S) report/VQA input of one series (see the module docstring): the image itself, the CT
    maximum-intensity projection, or a montage."""
    if not prepared:
        raise ValueError("study_view needs at least one image")
    if len(prepared) == 1:
        return prepared[0].pixels
    if projects(modality, prepared):
        square, _ = letterbox(np.max(np.stack([p.display for p in prepared]), axis=0), model_size)
        return normalise(square)
    return overview([p.display for p in prepared], model_size)


def read_header(path: Path) -> Dataset:
    """The data set of a (multi-frame) file with its pixel data left in the file: the attributes that
    :func:`prepare_frames` needs, without the memory of every frame."""
    return dcmread(path, defer_size=HEADER_DEFER_SIZE)


def prepare_frames(path: Path, header: Dataset, frames: Sequence[int], model_size: int, *,
                   window: tuple[float, float] | None = None) -> list[PreparedImage]:
    """The model inputs of frames *frames* (0-based, as :func:`prepare_image` takes them) of the multi-frame file
    at *path*, whose data set :func:`read_header` read; each frame is read from the file and decoded on its own."""
    _require_image(header)
    syntax = _transfer_syntax(header)
    _decoder_for(syntax)  # a syntax without an installed decoder is refused before any frame is read
    count = int(header.get("NumberOfFrames") or 1)
    outside = sorted(f for f in frames if not 0 <= f < count)
    if outside:
        raise ValueError(f"frame index {outside[0]} is outside the {count} frame(s) of the image")
    _require_whole_pixel_data(path, header)
    wanted = sorted(set(frames))
    try:
        decoders.check_decoded_size(header, len(wanted))  # the picked frames are held together
    except decoders.DecodedTooLargeError as exc:
        raise ImageDecodeError(str(exc)) from exc
    decoded: dict[int, np.ndarray] = {}
    try:
        for index, array in zip(wanted, iter_pixels(path, indices=wanted), strict=True):
            decoded[index] = array
    except Exception as exc:  # each plugin raises its own types; all mean "cannot decode these bytes"
        raise ImageDecodeError(f"pixel data in transfer syntax {syntax} ({syntax.name}) cannot be decoded: {exc}"
                               ) from exc
    prepared = []
    for index in frames:
        stored = decoded[index]
        photometric = "RGB" if stored.ndim == 3 else str(header.get("PhotometricInterpretation", ""))
        prepared.append(prepare_display(_display(stored, photometric, frame_header(header, index), window),
                                        model_size))
    return prepared


def _require_whole_pixel_data(path: Path, header: Dataset) -> None:
    """A truncated file is refused with the decoder's words before its frames are read."""
    element = header.get_item("PixelData", keep_deferred=True)
    if not isinstance(element, RawDataElement) or element.length == 0xFFFFFFFF:
        return  # read already (a small value), or encapsulated: the decoder checks each fragment
    available = path.stat().st_size - element.value_tell
    if available < element.length:
        raise ImageDecodeError(f"the pixel data is {available} bytes, less than expected ({element.length} bytes): "
                               "the file is truncated")


def _require_image(ds: Dataset) -> None:
    sop_class = UID(str(ds.get("SOPClassUID", "")))
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise NotAnImageError(f"SOP class {sop_class} ({sop_class.name or 'unknown'}) has no Pixel Data "
                              "(7FE0,0010): it is not an image")
    if sop_class in NON_IMAGE_PIXEL_SOP_CLASSES:
        raise NotAnImageError(f"SOP class {sop_class} ({sop_class.name}) holds pixel data that is not an image "
                              "for reading")
    if "PixelData" not in ds:
        raise ImageDecodeError(f"SOP class {sop_class} ({sop_class.name or 'unknown'}) stores float pixel data, "
                               "which is not supported")


def _decoder_for(syntax: UID) -> Any:
    """pydicom's decoder of *syntax*, or :class:`ImageDecodeError` saying why there is none."""
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise ImageDecodeError(f"transfer syntax {syntax} ({syntax.name}) has no pixel data decoder in pydicom"
                               ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise ImageDecodeError(f"transfer syntax {syntax} ({syntax.name}) needs a plugin that is not installed: "
                               f"{missing}")
    return decoder


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return UID(str(meta.TransferSyntaxUID))
    if getattr(ds, "is_little_endian", None) is False:
        raise ImageDecodeError("dataset has no (0002,0010) Transfer Syntax UID and is big endian")
    return ExplicitVRLittleEndian  # an in-memory dataset with native pixel data


def _luminance(rgb: np.ndarray, photometric: str) -> np.ndarray:
    if photometric not in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
        raise ImageDecodeError(f"photometric interpretation {photometric!r} of a 3-sample image is not supported")
    weights = np.asarray([0.299, 0.587, 0.114])
    gray = rgb.astype(np.float64) @ weights
    top = float(np.iinfo(rgb.dtype).max) if np.issubdtype(rgb.dtype, np.integer) else float(gray.max() or 1.0)
    return np.clip(gray / top, 0.0, 1.0).astype(np.float32)


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The first VOI LUT of the dataset, its output scaled by the LUT's own range to [0, 1]."""
    descriptor = [int(v) for v in ds.VOILUTSequence[0].LUTDescriptor]
    entries = descriptor[0] or 65536
    table = apply_voi(np.arange(descriptor[1], descriptor[1] + entries, dtype=np.float64), ds, index=0)
    low, high = float(table.min()), float(table.max())
    if high <= low:
        raise ValueError(f"VOI LUT Sequence (0028,3010) item 1 is constant ({low}): it shows nothing")
    return (apply_voi(values, ds, index=0).astype(np.float64) - low) / (high - low)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The DICOM window with output range [0, 1] (pydicom's implementation on a 16-bit unsigned output range)."""
    if width <= 0:
        raise ValueError(f"window width {width} must be greater than 0")
    spec = Dataset()
    spec.PhotometricInterpretation = "MONOCHROME2"
    spec.BitsStored = 16
    spec.PixelRepresentation = 0
    spec.WindowCenter = center
    spec.WindowWidth = max(width, 1.0) if function == "LINEAR" else width
    spec.VOILUTFunction = function
    return apply_windowing(values, spec) / 65535.0


def _dataset_window(values: np.ndarray, ds: Dataset) -> np.ndarray:
    centers, widths = ds["WindowCenter"], ds["WindowWidth"]
    center = float(centers.value[0] if centers.VM > 1 else centers.value)
    width = float(widths.value[0] if widths.VM > 1 else widths.value)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        raise ValueError(f"VOI LUT Function (0028,1056) {function!r} must be LINEAR, LINEAR_EXACT or SIGMOID")
    if width <= 0:
        raise ValueError(f"Window Width (0028,1051) {width} must be greater than 0")
    return _window(values, center, width, function)


def default_window_kind(ds: Dataset) -> Literal["ct-lung", "ct-soft-tissue", "percentile"]:
    """Which default window an image without its own VOI transform gets."""
    if str(ds.get("Modality", "")).upper() != "CT":
        return "percentile"
    text = " ".join(str(ds.get(keyword, "")) for keyword in
                    ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName")).upper()
    return "ct-lung" if any(word in text for word in _CHEST_WORDS) else "ct-soft-tissue"


def _default_window(values: np.ndarray, ds: Dataset) -> np.ndarray:
    kind = default_window_kind(ds)
    if kind == "ct-lung":
        return _window(values, *CT_LUNG_WINDOW, "LINEAR")
    if kind == "ct-soft-tissue":
        return _window(values, *CT_SOFT_TISSUE_WINDOW, "LINEAR")
    low, high = np.percentile(values, PERCENTILE_WINDOW)
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((values - low) / (high - low), 0.0, 1.0)
