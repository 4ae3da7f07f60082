"""bench/overlay.py on a real phantom radiograph (one short run), and the level the gateway writes its overlay at."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from bench import overlay as bench
from reporting.overlay import PNG_COMPRESS_LEVEL, render_overlay


def test_the_overlay_png_is_written_at_the_low_zlib_level_with_the_same_pixels():
    image = bench.radiograph()
    located = bench.findings(image)
    written = render_overlay(image, located)
    assert PNG_COMPRESS_LEVEL == 1 and written == render_overlay(image, located, compress_level=1)
    default = render_overlay(image, located, compress_level=bench.PILLOW_DEFAULT_LEVEL)
    assert written != default
    pixels = np.asarray(Image.open(io.BytesIO(written)))
    assert pixels.shape == (866, 1000, 3) and np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(default))))


def test_bench_overlay_reports_both_levels(capsys):
    assert bench.main(["--runs", "1", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "default  zlib 6" in out and "gateway  zlib 1" in out and "default / gateway (medians)" in out
    report = bench.measure(runs=1, repeat=1)
    assert report["image"] == "1000x866" and set(report["overlay_ms"]) == {"default", "gateway"}
    assert report["png_encode_ms_ratio_default_over_gateway"] > 0 and report["png_bytes"]["gateway"] > 0
