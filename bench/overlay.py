"""The overlay PNG (issue 21): ``reporting.overlay.render_overlay`` of a 1000 x 866 chest radiograph (a phantom,
12-bit MONOCHROME2, two findings) at Pillow's default zlib level (6) and at the level the gateway writes
(``PNG_COMPRESS_LEVEL``, 1).

    .venv/bin/python -m bench.overlay [--runs 3] [--repeat 5] [--json]

Each run renders ``--repeat`` overlays at each level and keeps the mean per overlay; the table gives the min,
median and max of the runs, the PNG size, and the ratio default / gateway of the medians. The whole overlay is
timed (decode of the pixel data, windowing, drawing, PNG), and the PNG encoding alone (``Image.save`` of the same
picture), which is what the level changes; the pixels of both PNGs are checked to be the same.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from core.manifest import InstanceEntry, SeriesEntry
from core.result import Finding
from model.phantom_anatomy import render_radiograph
from reporting.context import LocatedFinding
from reporting.overlay import PNG_COMPRESS_LEVEL, render_overlay

ROWS, COLUMNS = 866, 1000
PILLOW_DEFAULT_LEVEL = 6
MAX_12_BIT = 4095


def radiograph(seed: int = 21) -> Dataset:
    """A 1000 x 866 phantom chest radiograph as a DICOM data set (uncompressed, 12 bits stored)."""
    rendering = render_radiograph(np.random.default_rng(seed), ROWS, COLUMNS, ["nodule", "pneumothorax"])
    values = np.rint(rendering.images[0] * MAX_12_BIT).clip(0, MAX_12_BIT).astype("<u2")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "CR", "MONOCHROME2", 1
    ds.Rows, ds.Columns = values.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 0.42 * MAX_12_BIT, 0.85 * MAX_12_BIT
    ds.PixelData = values.tobytes()
    return ds


def findings(image: Dataset) -> list[LocatedFinding]:
    series = SeriesEntry(series_instance_uid=generate_uid(), modality="CR", instances=[
        InstanceEntry(sop_instance_uid=image.SOPInstanceUID, sop_class_uid=image.SOPClassUID, path="bench.dcm",
                      transfer_syntax_uid=ExplicitVRLittleEndian)])
    boxes = [("nodule", (610.0, 300.0, 660.0, 350.0), "left"), ("pneumothorax", (150.0, 90.0, 380.0, 260.0), "right")]
    return [LocatedFinding(index, Finding(label=label, sop_instance_uid=image.SOPInstanceUID, box=box,
                                          laterality=side), image, series)
            for index, (label, box, side) in enumerate(boxes)]


def _ms_per_call(call: Any, repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - started) * 1000 / repeat


def measure(runs: int, repeat: int) -> dict[str, Any]:
    image = radiograph()
    located = findings(image)
    levels = {"default": PILLOW_DEFAULT_LEVEL, "gateway": PNG_COMPRESS_LEVEL}
    pngs = {name: render_overlay(image, located, compress_level=level) for name, level in levels.items()}
    decoded = {name: np.asarray(Image.open(io.BytesIO(png))) for name, png in pngs.items()}
    if not np.array_equal(decoded["default"], decoded["gateway"]):
        raise AssertionError("the PNGs of the two levels do not hold the same pixels")
    picture = Image.fromarray(decoded["gateway"])

    def encode(level: int) -> None:
        picture.save(io.BytesIO(), format="PNG", compress_level=level)

    overlay: dict[str, list[float]] = {name: [] for name in levels}
    png: dict[str, list[float]] = {name: [] for name in levels}
    for _ in range(runs):
        for name, level in levels.items():
            overlay[name].append(_ms_per_call(lambda lv=level: render_overlay(image, located, compress_level=lv),
                                              repeat))
            png[name].append(_ms_per_call(lambda lv=level: encode(lv), repeat))

    def summary(samples: list[float]) -> dict[str, float]:
        return {"min": round(min(samples), 1), "median": round(statistics.median(samples), 1),
                "max": round(max(samples), 1)}

    report: dict[str, Any] = {"image": f"{COLUMNS}x{ROWS}", "runs": runs, "repeat": repeat, "levels": levels,
                              "png_bytes": {name: len(data) for name, data in pngs.items()}}
    for what, samples in (("overlay_ms", overlay), ("png_encode_ms", png)):
        report[what] = {name: summary(values) for name, values in samples.items()}
        report[f"{what}_ratio_default_over_gateway"] = round(
            statistics.median(samples["default"]) / statistics.median(samples["gateway"]), 2)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overlay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5, help="overlays per run and level")
    parser.add_argument("--json", action="store_true", help="the report as JSON")
    args = parser.parse_args(argv)
    report = measure(args.runs, args.repeat)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"overlay of a {report['image']} radiograph, {args.runs} runs x {args.repeat} per level "
          "(ms per overlay: min / median / max)")
    for name, level in report["levels"].items():
        o, p = report["overlay_ms"][name], report["png_encode_ms"][name]
        print(f"  {name:<8} zlib {level}: overlay {o['min']:7.1f} / {o['median']:7.1f} / {o['max']:7.1f}   "
              f"PNG encode {p['min']:7.1f} / {p['median']:7.1f} / {p['max']:7.1f}   "
              f"{report['png_bytes'][name] / 1024:7.1f} KiB")
    print(f"  default / gateway (medians): overlay {report['overlay_ms_ratio_default_over_gateway']:.2f}x, "
          f"PNG encode {report['png_encode_ms_ratio_default_over_gateway']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
