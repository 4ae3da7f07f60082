"""The study page's Cornerstone3D viewer in a real headless Chromium (Playwright), over the worklist's WADO-RS.

A CT series of many slices (the project's CT phantom, resampled to 1 mm between its 5 mm sections; instance numbers
shuffled, so only the positions give the slice order) with AI boxes on slices other than the first: scrolling
(wheel, arrow keys, slider), window presets (the viewport's VOI read from the page), zoom, the jump from a finding
to its slice, the box drawn there only and over the finding's pixels, the keyboard review (n/p, r), the
"open in viewer" link. The screenshot of the view goes into the test's folder, with RADDRAFT_UPDATE_SCREENSHOTS=1
into docs/screenshots/ for the README.
"""

from __future__ import annotations

import copy
import os
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pydicom
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright
from pydicom.uid import generate_uid
from reporting_dicom_helpers import classic_slices, legacy_enhanced
from worklist_helpers import THREE_NODULES_CT, settings_for, spool_study, write_draft

from core.result import DraftReport, Finding
from model.imaging import display_values
from model.phantoms import generate_study, study_rng
from worklist import auth
from worklist.app import WorklistApp
from worklist.bridge import Bridge
from worklist.server import RunningServer
from worklist.storage import Store

CHROMIUM = "/usr/bin/chromium"
# WebGL through SwiftShader where the build has it; Cornerstone falls back to its CPU renderer where it has not
CHROMIUM_ARGS = ["--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
README_SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
VIEWER_TEMPLATE = "https://pacs.example.org/viewer?StudyInstanceUIDs={study_uid}"
STEP_MM = 1.0
PRESETS = {"lung": (1500, -600), "mediastinum": (350, 50), "bone": (2000, 300), "brain": (80, 40)}


def resampled_ct(sections: list[pydicom.Dataset], step_mm: float) -> tuple[list[pydicom.Dataset], dict[str, str]]:
    """The phantom's sections resampled every *step_mm* along the slice normal (values interpolated linearly
    between neighbouring sections); new UIDs, instance numbers shuffled. Also: section SOP UID -> the new slice at
    its position."""
    z = [float(ds.ImagePositionPatient[2]) for ds in sections]
    order = np.argsort(z)
    z_sorted = np.array(z)[order]
    stored = np.stack([sections[i].pixel_array.astype(np.float64) for i in order])
    series_uid = generate_uid()
    positions = np.arange(z_sorted[0], z_sorted[-1] + step_mm / 2, step_mm)
    numbers = np.random.default_rng(7).permutation(len(positions)) + 1
    slices, of_section = [], {}
    for position, number in zip(positions, numbers, strict=True):
        upper = min(int(np.searchsorted(z_sorted, position, side="right")), len(z_sorted) - 1)
        lower = max(upper - 1, 0)
        span = z_sorted[upper] - z_sorted[lower]
        weight = 0.0 if span == 0 else (position - z_sorted[lower]) / span
        values = np.rint((1 - weight) * stored[lower] + weight * stored[upper]).astype(np.int16)
        ds = copy.deepcopy(sections[0])
        ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, 1
        ds.SeriesDescription = f"LUNG {step_mm:g} mm (resampled)"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = int(number)
        ds.ImagePositionPatient = [*sections[0].ImagePositionPatient[:2], round(float(position), 3)]
        ds.SliceLocation = round(float(position), 3)
        ds.SliceThickness = step_mm
        ds.PixelData = values.tobytes()
        slices.append(ds)
        for k in np.flatnonzero(np.isclose(z_sorted, position)):
            of_section[str(sections[order[k]].SOPInstanceUID)] = str(ds.SOPInstanceUID)
    return slices, of_section


@pytest.fixture
def served(tmp_path, screenshots):
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'worklist.sqlite'}", viewer_url_template=VIEWER_TEMPLATE)
    store = Store.from_settings(settings)
    try:
        store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                       organization="IR", now=datetime.now(UTC))
        phantom = generate_study(study_rng(*THREE_NODULES_CT), "CT")
        slices, of_section = resampled_ct(phantom.datasets, STEP_MM)
        # the left nodule (section 2) and the right one of section 1: neither on the first slice
        truth = [phantom.findings[0], phantom.findings[1]]
        findings = [Finding(label=f.label, sop_instance_uid=of_section[f.sop_instance_uid],
                            box=tuple(map(float, f.box)), laterality=f.laterality, site=f.site) for f in truth]
        report = DraftReport(findings="Left upper lobe nodule. Right upper lobe nodule.",
                             impression="Two pulmonary nodules.")
        sections = [copy.deepcopy(ds) for ds in phantom.datasets]  # the 5 mm sections: a second series
        thick_uid = generate_uid()
        for ds in sections:
            ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = thick_uid, 2, "LUNG 5 mm"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        manifest, result = spool_study(settings, slices + sections, findings=findings, report=report,
                                       analysed=sorted(of_section.values()))
        bridge = Bridge(settings, store)
        entry = bridge.register_draft(manifest, result)
        # a MONOCHROME1 CR with two findings (another seed than the CT's: the same seed gives the same study UID)
        radiograph = write_draft(settings, (5, 8), accession="ACC-CR")
        assert radiograph.phantom.datasets[0].PhotometricInterpretation == "MONOCHROME1"
        cr_entry = bridge.register_draft(radiograph.manifest_path, radiograph.result_path)
        with RunningServer(WorklistApp(bridge)) as server:
            yield server, store, entry, slices, findings, cr_entry, radiograph
    finally:
        store.close()


@pytest.fixture
def screenshots(tmp_path):
    folder = README_SCREENSHOTS if os.environ.get("RADDRAFT_UPDATE_SCREENSHOTS") == "1" else tmp_path / "shots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _data(page, name: str) -> str:
    return page.locator("#viewport").get_attribute(f"data-{name}") or ""


def _voi(page) -> tuple[float, float]:
    return float(_data(page, "voi-lower")), float(_data(page, "voi-upper"))


def _expected_rect(page, box: tuple[float, ...], rows: int, columns: int) -> tuple[float, float, float, float]:
    """Where a box in source pixels lies on the screen with the image fitted to the viewport (the camera reset):
    scaled by min(width / columns, height / rows) and centred, computed here from the element's size alone."""
    element = page.locator("#cs-element").bounding_box()
    scale = min(element["width"] / columns, element["height"] / rows)
    left = element["x"] + (element["width"] - columns * scale) / 2
    top = element["y"] + (element["height"] - rows * scale) / 2
    return left + box[0] * scale, top + box[1] * scale, (box[2] - box[0]) * scale, (box[3] - box[1]) * scale


def _fitted(page, rows: int, columns: int) -> tuple[int, int, int, int]:
    """The screen rectangle (x, y, width, height) of the whole image fitted to the viewport."""
    return tuple(round(v) for v in _expected_rect(page, (0, 0, columns, rows), rows, columns))


def _shown_like(page, expected: np.ndarray, path: Path) -> float:
    """The correlation of the image on the screen (a screenshot of the fitted image, boxes hidden) with *expected*
    display values (rows, cols), resampled to the screen's size."""
    page.uncheck("#toggle-boxes")
    x, y, width, height = _fitted(page, *expected.shape)
    page.screenshot(path=str(path), clip={"x": x, "y": y, "width": width, "height": height})
    page.check("#toggle-boxes")
    shown = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    wanted = np.asarray(Image.fromarray((expected * 255).astype(np.uint8)).resize(
        (shown.shape[1], shown.shape[0]), Image.Resampling.BILINEAR), dtype=np.float64)
    return float(np.corrcoef(shown.ravel(), wanted.ravel())[0, 1])


def _sign_in(page, url: str) -> None:
    page.goto(url + "/login")
    page.fill("input[name=username]", "curie")
    page.fill("input[name=password]", "radium-226")
    page.click("button[type=submit]")
    expect(page).to_have_url(url + "/")


def test_a_monochrome1_radiograph_is_a_stack_of_one_shown_as_the_project_displays_it(served, tmp_path):
    server, _, _, _, _, cr_entry, radiograph = served
    dataset = radiograph.phantom.datasets[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            _sign_in(page, server.url)
            page.goto(f"{server.url}/studies/{cr_entry}")
            expect(page.get_by_test_id("slice-label")).to_have_text("Slice 1 / 1", timeout=30_000)
            expect(page.locator("#series-select")).to_be_hidden()
            expect(page.locator("#overlay g.box")).to_have_count(2)
            # bright = dense, as model/imaging.py shows it (its window, MONOCHROME1 inverted once), not a negative
            assert _shown_like(page, display_values(dataset), tmp_path / "cr.png") > 0.95
            page.keyboard.press("ArrowDown")  # one slice: nowhere to go
            expect(page.locator("#viewport")).to_have_attribute("data-slice", "0")
        finally:
            browser.close()


def test_ct_series_scroll_window_jump_and_review_in_chromium(served, screenshots, tmp_path):
    server, store, entry, slices, findings, _, _ = served
    by_sop = {str(ds.SOPInstanceUID): ds for ds in slices}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            _sign_in(page, server.url)
            study_uid = str(slices[0].StudyInstanceUID)
            link = page.locator("#worklist tbody tr").filter(has_text="PH").get_by_test_id("open-in-viewer")
            expect(link).to_have_attribute("href", VIEWER_TEMPLATE.replace("{study_uid}", quote(study_uid, safe="")))

            page.goto(f"{server.url}/studies/{entry}")
            doc = page.request.get(f"{server.url}/api/studies/{entry}").json()
            series, thick = doc["series"]
            count = len(slices)
            assert series["series_instance_uid"] == slices[0].SeriesInstanceUID and len(thick["images"]) == 4
            assert series["images"] == list(range(count))
            # the slice order is the position along the normal, whatever the instance numbers say
            z = [float(by_sop[doc["images"][i]["sop_instance_uid"]].ImagePositionPatient[2]) for i in series["images"]]
            assert z == sorted(z) or z == sorted(z, reverse=True)
            assert [by_sop[doc["images"][i]["sop_instance_uid"]].InstanceNumber for i in range(count)] != \
                sorted(range(1, count + 1))
            expect(page.get_by_test_id("slice-label")).to_have_text(f"Slice 1 / {count}", timeout=30_000)
            expect(page.locator("#viewport")).to_have_attribute("data-slice", "0")
            expect(page.get_by_test_id("open-in-viewer")).to_be_visible()
            expect(page.locator("#series-select option")).to_have_count(2)
            expect(page.get_by_test_id("shortcuts")).to_contain_text("a accept · r reject · n / p next / previous")
            # the image's own (first) window, W1500 L-600, by the DICOM linear VOI function (PS3.3 C.11.2.1.2)
            assert _voi(page) == (-600 - 0.5 - (1500 - 1) / 2, -600 - 0.5 + (1500 - 1) / 2)

            # scrolling: the wheel over the image, the arrow keys, the slider
            page.locator("#cs-element").hover()
            page.mouse.wheel(0, 120)
            expect(page.locator("#viewport")).not_to_have_attribute("data-slice", "0")
            after_wheel = int(_data(page, "slice"))
            page.keyboard.press("ArrowDown")
            expect(page.locator("#viewport")).to_have_attribute("data-slice", str(after_wheel + 1))
            expect(page.get_by_test_id("slice-label")).to_have_text(f"Slice {after_wheel + 2} / {count}")
            page.keyboard.press("ArrowUp")
            page.keyboard.press("ArrowUp")
            expect(page.locator("#viewport")).to_have_attribute("data-slice", str(after_wheel - 1))
            page.locator("#slice-slider").fill(str(count - 1))
            expect(page.locator("#viewport")).to_have_attribute("data-slice", str(count - 1))

            # window presets change the viewport's VOI; "image" brings the dataset's own back
            for name, (width, level) in PRESETS.items():
                page.click(f".preset[data-preset={name}]")
                expect(page.locator("#viewport")).to_have_attribute("data-preset", name)
                expect(page.locator("#viewport")).to_have_attribute("data-voi-lower", str(level - width // 2))
                expect(page.locator("#viewport")).to_have_attribute("data-voi-upper", str(level + width // 2))
            page.click(".preset[data-preset=image]")
            expect(page.locator("#viewport")).to_have_attribute("data-voi-upper", "149")
            assert _voi(page) == (-1350, 149)
            page.click(".preset[data-preset=mediastinum]")  # a preset stays on while scrolling
            expect(page.locator("#viewport")).to_have_attribute("data-voi-upper", "225")
            page.keyboard.press("ArrowUp")
            expect(page.locator("#viewport")).to_have_attribute("data-slice", str(count - 2))
            assert _voi(page) == (-125, 225)
            page.click(".preset[data-preset=lung]")
            expect(page.locator("#viewport")).to_have_attribute("data-voi-upper", "150")
            page.keyboard.press("ArrowDown")
            expect(page.locator("#viewport")).to_have_attribute("data-slice", str(count - 1))
            last = by_sop[doc["images"][series["images"][count - 1]]["sop_instance_uid"]]
            assert _shown_like(page, display_values(last, window=(-600, 1500)), tmp_path / "ct.png") > 0.95

            # zoom: Ctrl+wheel and the buttons; Fit resets
            zoom = float(_data(page, "zoom"))
            page.locator("#cs-element").hover()
            page.keyboard.down("Control")
            page.mouse.wheel(0, -240)
            page.keyboard.up("Control")
            expect(page.locator("#viewport")).not_to_have_attribute("data-zoom", f"{zoom:.4f}")
            page.click("#zoom-in")
            page.click("#zoom-fit")
            expect(page.locator("#viewport")).to_have_attribute("data-zoom", f"{zoom:.4f}")

            # the series selector shows the other series (no finding on it); a finding brings its own series back
            page.select_option("#series-select", "1")
            expect(page.get_by_test_id("slice-label")).to_have_text("Slice 1 / 4")
            expect(page.locator("#viewport")).to_have_attribute("data-series", "1")
            expect(page.locator("#overlay g.box")).to_have_count(0)

            # a finding jumps to its slice; its box is drawn there, over its pixels, and nowhere else
            boxes = page.locator("#overlay g.box")
            items = page.locator("#findings li")
            expect(items).to_have_count(2)
            for index, finding in enumerate(findings):
                image = doc["findings"][index]["image"]
                slice_index = series["images"].index(image)
                assert slice_index != 0
                items.nth(index).locator(".label").click()
                expect(page.locator("#viewport")).to_have_attribute("data-slice", str(slice_index))
                expect(page.locator("#viewport")).to_have_attribute("data-series", "0")
                expect(boxes).to_have_count(1)
                drawn = page.locator(f'#overlay g.box[data-index="{index}"] rect')
                expect(drawn).to_have_count(1)
                # the rectangle's geometry on the screen (its stroke left out)
                got = drawn.evaluate("r => { const b = r.getBBox(); const s = r.ownerSVGElement"
                                     ".getBoundingClientRect(); return [s.x + b.x, s.y + b.y, b.width, b.height]; }")
                expected = _expected_rect(page, finding.box, doc["images"][image]["rows"],
                                          doc["images"][image]["columns"])
                assert np.allclose(got, expected, atol=0.75), (got, expected)
                away, back = ("ArrowUp", "ArrowDown") if slice_index == count - 1 else ("ArrowDown", "ArrowUp")
                page.keyboard.press(away)  # the neighbouring slice has no box
                expect(page.locator("#viewport")).to_have_attribute(
                    "data-slice", str(slice_index + (-1 if away == "ArrowUp" else 1)))
                expect(boxes).to_have_count(0)
                page.keyboard.press(back)
                expect(page.locator("#viewport")).to_have_attribute("data-slice", str(slice_index))
                expect(boxes).to_have_count(1)
            page.screenshot(path=str(screenshots / "viewer.png"))

            # keyboard review: n / p walk the findings (to their slices), r rejects the one selected
            first_slice = series["images"].index(doc["findings"][0]["image"])
            page.keyboard.press("n")  # after the last one: the first again
            expect(page.locator("#viewport")).to_have_attribute("data-slice", str(first_slice))
            expect(page.locator('#overlay g.box[data-index="0"]')).to_have_class("box finding pending selected")
            page.keyboard.press("r")
            expect(items.nth(0)).to_have_class("rejected selected")
            assert page.request.get(f"{server.url}/api/studies/{entry}").json()["findings"][0]["decision"] == \
                "rejected"
            page.keyboard.press("p")
            second_slice = series["images"].index(doc["findings"][1]["image"])
            expect(page.locator("#viewport")).to_have_attribute("data-slice", str(second_slice))
            page.keyboard.press("a")
            expect(items.nth(1)).to_have_class("accepted selected")
            expect(page.locator('#overlay g.box[data-index="1"]')).to_have_class("box finding accepted selected")
            assert errors == []
        finally:
            browser.close()
    reviews = store.finding_reviews(entry)
    assert (reviews[0].decision.value, reviews[1].decision.value) == ("rejected", "accepted")
    actions = [e.action for e in store.audit_entries(entry)]
    assert actions.count("finding-rejected") == 1 and actions.count("finding-accepted") == 1


@pytest.fixture
def enhanced_served(tmp_path):
    """A Legacy Converted Enhanced CT of six frames given top down (frame 1 highest), a finding on frame 3."""
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'worklist.sqlite'}")
    store = Store.from_settings(settings)
    try:
        store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                       organization="IR", now=datetime.now(UTC))
        enhanced = legacy_enhanced(classic_slices("CT_small.dcm", 6))
        finding = Finding(label="nodule", sop_instance_uid=str(enhanced.SOPInstanceUID), frame_number=3,
                          box=(40.0, 50.0, 60.0, 70.0), laterality="left", site="upper lobe")
        manifest, result = spool_study(settings, [enhanced], findings=[finding])
        entry = Bridge(settings, store).register_draft(manifest, result)
        with RunningServer(WorklistApp(Bridge(settings, store))) as server:
            yield server, entry, enhanced
    finally:
        store.close()


def test_an_enhanced_ct_is_a_stack_of_its_frames_in_spatial_order(enhanced_served, tmp_path):
    server, entry, enhanced = enhanced_served
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            _sign_in(page, server.url)
            page.goto(f"{server.url}/studies/{entry}")
            doc = page.request.get(f"{server.url}/api/studies/{entry}").json()
            assert [image["frame_number"] for image in doc["images"]] == [6, 5, 4, 3, 2, 1]  # bottom up
            expect(page.get_by_test_id("slice-label")).to_have_text("Slice 1 / 6", timeout=30_000)
            # each frame with its own functional groups (position, rescale, window): the first slice is frame 6
            frame_6, frame_1 = display_values(enhanced, 5), display_values(enhanced, 0)
            shown_6 = _shown_like(page, frame_6, tmp_path / "frame6.png")
            assert shown_6 > 0.98 and shown_6 > _shown_like(page, frame_1, tmp_path / "frame1.png")
            page.get_by_test_id("finding").locator(".label").click()  # frame 3 is the fourth slice
            expect(page.locator("#viewport")).to_have_attribute("data-slice", "3")
            expect(page.locator("#overlay g.box")).to_have_count(1)
            assert _shown_like(page, display_values(enhanced, 2), tmp_path / "frame3.png") > 0.98
            page.keyboard.press("ArrowUp")
            expect(page.locator("#viewport")).to_have_attribute("data-slice", "2")
            expect(page.locator("#overlay g.box")).to_have_count(0)
        finally:
            browser.close()
