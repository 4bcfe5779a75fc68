"""The node's results in a real viewer: OHIF (npm @ohif/app) in headless Chromium,
reading Orthanc's DICOMweb plugin, as a radiologist would open them in the PACS.

One cine MR, one CT and one CXR go through the node into Orthanc (the originals
too, as a PACS holds them); each study is then opened in OHIF and checked
through the DOM, the viewer's own state and the pixels of a screenshot. Each
run keeps its screenshots in its tmp folder; ``make docs-screenshots``
(VIEWER_SCREENSHOTS_TO_DOCS=1) refreshes the README's copies in docs/.
What OHIF 3.13.2 cannot show is pinned by strict xfails, with the reason.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    NodeProcess,
    Orthanc,
    ct_route,
    storescu,
    wait_for,
    write_ct_series,
    write_datasets,
    model_label,
)
from pydicom import dcmread
from viewer import (
    Browser,
    OhifServer,
    coloured_fraction,
    ohif_dist,
    save_small_png,
    skip_tour_script,
)

from dicom_node_synthetic import cardiac_phantom, cxr_phantom
from dicom_node_synthetic.dicom_dx import dx_image
from dicom_node_synthetic.dicom_mr import cine_series

CARDIAC_MODEL = model_label("cardiac_seg")
CT_MODEL = model_label("ct_denoise")
CXR_MODEL = model_label("cxr_triage")

DOCS = Path(__file__).resolve().parent.parent / "docs"
SAVE_DOCS = os.environ.get("VIEWER_SCREENSHOTS_TO_DOCS") == "1"
RESULTS = {"cine": 4, "ct": 9, "cxr": 2}  # SEG ED + ES (a series each), SR, SC | 8 denoised, SR | SC, SR
SEGMENTS = ["LV cavity", "LV myocardium", "RV cavity"]

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc with DICOMweb, fed through a node; yields (orthanc, study UIDs, workdir)."""
    if not Path(Orthanc.DICOMWEB_PLUGIN).exists():
        raise RuntimeError(f"{Orthanc.DICOMWEB_PLUGIN} missing; `make test` installs orthanc-dicomweb")
    work = tmp_path_factory.mktemp("viewer")
    orthanc = Orthanc(work / "orthanc", dicomweb=True).start()
    routes = [
        {"name": "cine", "pipeline": "cardiac_seg", "model": "cardiac_seg", "destinations": ["pacs"],
         "quiet_seconds": 1.5, "group_by": "study", "match": [{"keyword": "Modality", "equals": "MR"}]},
        {"name": "cxr", "pipeline": "cxr_triage", "model": "cxr_triage", "destinations": ["pacs"],
         "quiet_seconds": 1, "match": [{"keyword": "Modality", "one_of": ["DX", "CR"]}]},
        ct_route(destinations=["pacs"]),
    ]
    node = NodeProcess(work / "node", peers=[orthanc.peer()], routes=routes,
                       destinations=[{"name": "pacs", "kind": "dicom", "peer": "pacs"}])
    try:
        node.start()
        cine = cardiac_phantom.make_cine(np.random.default_rng(5), n_slices=6, n_phases=8, size=160)
        files = {
            "cine": write_datasets(work / "cine", cine_series(
                cine.images, seed="viewer-cine", pixel_spacing_mm=cine.pixel_spacing_mm,
                slice_spacing_mm=cine.slice_spacing_mm)),
            "ct": write_ct_series(work / "ct", n=8, size=128, seed="viewer-ct"),
            "cxr": write_datasets(work / "cxr", [dx_image(cxr_phantom.make_radiograph(
                np.random.default_rng(8), "pneumothorax", size=(768, 640), severity="obvious").image,
                seed="viewer-cxr")]),
        }
        every = [f for paths in files.values() for f in paths]
        storescu(node.port, every)
        storescu(orthanc.dicom_port, every, aec=orthanc.aet)
        studies = {k: dcmread(v[0], stop_before_pixels=True).StudyInstanceUID for k, v in files.items()}
        expected = {k: len(files[k]) + RESULTS[k] for k in files}

        def all_in() -> bool:
            counts = {k: _instances_in_study(orthanc, uid) for k, uid in studies.items()}
            return counts == expected

        wait_for(all_in, 150, 0.5, f"results in Orthanc: {expected}")
        yield orthanc, studies, work
    finally:
        node.stop()
        orthanc.stop()


def _instances_in_study(orthanc: Orthanc, study_uid: str) -> int:
    found = orthanc.get(f"/dicom-web/studies?StudyInstanceUID={study_uid}&includefield=00201208") or []
    return int(found[0]["00201208"]["Value"][0]) if found else 0


@pytest.fixture(scope="module")
def ohif(pacs):
    orthanc, _, work = pacs
    with OhifServer(ohif_dist(), orthanc.dicomweb_url) as server:
        browser = Browser(work / "chromium")
        browser.before_load(skip_tour_script())
        try:
            yield Viewer(browser, server.url, work)
        finally:
            (work / "console.log").write_text("\n".join(browser.console))
            browser.close()


class Viewer:
    """OHIF's study view, through its DOM and the state it keeps on window."""

    def __init__(self, browser: Browser, url: str, work: Path) -> None:
        self.b, self.url, self.work = browser, url, work

    def open(self, study_uid: str, initial_series: str | None = None) -> list[str]:
        """Open a study; returns the study browser's series, as 'MODALITY description'."""
        self.b.console.clear()
        self.b.goto(f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"
                    + (f"&initialSeriesInstanceUID={initial_series}" if initial_series else ""))
        self.b.wait("(p => p && p.querySelector('canvas') && !p.innerText.includes('Loading'))"
                    "(document.querySelector('[data-cy=viewport-pane]'))", 90, "the first image")
        return self.b.js("[...document.querySelectorAll('[data-cy^=study-browser-thumbnail]')]"
                         ".map(e => e.innerText.split('\\n').slice(0, 2).join(' '))")

    def wait_first_image(self) -> None:
        """Wait until the stack viewport opened with the study shows an image.
        Switching series before that made OHIF throw "The stack viewport has
        been destroyed" from the first load's callback (seen once in CI): an
        error of switching mid-load, not of the object shown next."""
        self.b.wait("(v => v && v.getImageIds?.().length > 0 && v.getCurrentImageId())"
                    "(window.cornerstone.getEnabledElements()[0]?.viewport)", 60, "the first series shown")
        time.sleep(0.5)

    def show(self, series: str) -> None:
        """Double-click the series whose study-browser entry starts with ``series``."""
        self.b.click(f"[...document.querySelectorAll('[data-cy^=study-browser-thumbnail]')]"
                     f".find(e => e.innerText.replace(/\\n/g, ' ').startsWith({json.dumps(series)}))", 2)

    def panel(self, button: str) -> str:
        """Open a right-hand panel (its button's data-cy); returns the panel's text."""
        self.b.click(f"document.querySelector('[data-cy={button}]')")
        time.sleep(1.0)
        # The panel: the nearest ancestor of the panel header that holds more than the header.
        return self.b.js("""(e => { for (let i = 0; e && i < 8; i++, e = e.parentElement)
            if (e.innerText.trim().length > 12) return e.innerText; return ''; })(
            document.querySelector('[data-cy=side-panel-header-right]'))""")

    def viewport_box(self, inset: tuple[int, int, int, int] = (10, 10, 20, 10)) -> tuple[int, int, int, int]:
        r = self.b.js("(r => [r.left, r.top, r.right, r.bottom])(document.querySelector("
                      "'[data-cy=viewport-pane]').getBoundingClientRect())")
        return (int(r[0]) + inset[0], int(r[1]) + inset[1], int(r[2]) - inset[2], int(r[3]) - inset[3])

    def error(self) -> str | None:
        """The details of the error OHIF shows, if it shows one."""
        if "Something went wrong" not in self.b.js("document.body.innerText"):
            return None
        self.b.click("[...document.querySelectorAll('button')].find(e => e.innerText === 'Show Details')", 1, 5)
        time.sleep(0.5)
        details = self.b.js("document.body.innerText").split("Show Details")[0].split("Copy")
        return details[-1].strip()[:1500] if len(details) > 1 else details[0][-1500:]

    def assert_no_error(self) -> None:
        details = self.error()
        assert details is None, f"OHIF shows an error: {details}"

    def viewport_text(self) -> str:
        return self.b.js("document.querySelector('[data-cy=viewport-pane]').innerText")

    def wait_pixels(self, ok, what: str, timeout: float = 30) -> bytes:
        """Screenshots until ``ok(png)``; returns the one that was."""
        deadline = time.monotonic() + timeout
        while not ok(png := self.b.screenshot()):
            if time.monotonic() > deadline:
                (self.work / "timed-out.png").write_bytes(png)
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.5)
        return png

    def screenshot(self, name: str, error_allowed: bool = False) -> bytes:
        if not error_allowed:
            self.assert_no_error()
        png = self.b.screenshot(self.work / f"{name}.png")
        if SAVE_DOCS:
            save_small_png(png, DOCS / f"{name}.png")
        return png


# --- cine MR: SEG, SR, SC --------------------------------------------------

SEG_STATE = """(() => {
  const seg = window.cornerstoneTools.segmentation.state.getSegmentations()[0];
  if (!seg) return null;
  const counts = {};
  const frames = [];
  (seg.representationData.Labelmap.imageIds || []).forEach((id, i) => {
    const image = window.cornerstone.cache.getImage(id);
    if (!image) return;
    let n = 0;
    for (const v of image.getPixelData()) if (v) { counts[v] = (counts[v] || 0) + 1; n++; }
    if (n) frames.push(i);
  });
  return {labels: Object.values(seg.segments).map(s => s.label), counts, frames,
          viewports: window.cornerstone.getEnabledElements().map(e => e.viewport.type)};
})()"""


SEG_COLOURS = """(() => {
  const vp = window.cornerstone.getEnabledElements()[0].viewport;
  const seg = window.cornerstoneTools.segmentation.state.getSegmentations()[0];
  return [1, 2, 3].map(i => Array.from(window.cornerstoneTools.segmentation.config.color
    .getSegmentIndexColor(vp.id, seg.segmentationId, i)).slice(0, 3));
})()"""


def _colour_pixels(png: bytes, box: tuple[int, int, int, int], rgb: list[int], tolerance: int = 40) -> int:
    """Pixels in ``box`` within ``tolerance`` of ``rgb`` on every channel: a segment's outline."""
    import io

    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB").crop(box)).astype(int)
    return int((np.abs(image - np.array(rgb)).max(axis=2) <= tolerance).sum())


CINE_LOADED = """(() => {
  const vp = window.cornerstone.getEnabledElements()[0].viewport;
  const volume = window.cornerstone.cache.getVolume(vp.getAllVolumeIds()[0]);
  return Boolean(volume && volume.loadStatus && volume.loadStatus.loaded);
})()"""


def _settled_colour_pixels(ohif, box: tuple[int, int, int, int], colours: list[list[int]],
                           timeout: float = 10.0) -> list[int]:
    """Each colour's pixel count once three screenshots 0.4 s apart agree (the render has settled)."""
    deadline = time.monotonic() + timeout
    seen: list[list[int]] = []
    while True:
        time.sleep(0.4)
        seen.append([_colour_pixels(ohif.b.screenshot(), box, c) for c in colours])
        if len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3] or time.monotonic() > deadline:
            return seen[-1]


SHOW = """(async (group, slice) => {
  const vp = window.cornerstone.getEnabledElements()[0].viewport;
  window.cornerstone.cache.getVolume(vp.getAllVolumeIds()[0]).dimensionGroupNumber = group;
  await window.cornerstone.utilities.jumpToSlice(vp.element, {imageIndex: slice});
  vp.render();
})"""


@pytest.fixture(scope="module")
def cardiac_seg(ohif, pacs):
    _, studies, work = pacs
    series = ohif.open(studies["cine"])
    ohif.show("SEG AI cardiac SEG ES")
    state = ohif.b.wait(f"(s => s && Object.keys(s.counts).length && s)({SEG_STATE})", 60, "the SEG decoded")
    text = ohif.panel("panelSegmentation-btn")
    seg_uids = ohif.b.js("window.services.displaySetService.getActiveDisplaySets()"
                         ".filter(d => d.Modality === 'SEG').map(d => d.SOPInstanceUID)")
    # The ES SEG, the one shown: each phase's SEG is a display set of its own.
    [seg] = [ds for ds in _node_outputs(work, "SEG") if ds.ContentLabel == "ES_PHASE"]
    assert seg.SOPInstanceUID in seg_uids
    # The cine phase (OHIF's "dimension group", 1-based, by trigger time) the shown SEG belongs to.
    cine = {ds.SOPInstanceUID: float(ds.TriggerTime)
            for ds in (dcmread(f, stop_before_pixels=True) for f in sorted((work / "cine").glob("*.dcm")))}
    times = sorted(set(cine.values()))
    ref = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    group = times.index(cine[ref.ReferencedSOPInstanceUID]) + 1
    colours = ohif.b.js(SEG_COLOURS)
    left, top, right, bottom = ohif.viewport_box()
    box = (left, top + 110, right, bottom - 40)  # below the cine player, the only colour there without the SEG
    # A fixed pause before each screenshot raced the 4D volume's streaming on a
    # loaded machine (CI once saw no colour on any slice): wait for every phase's
    # images, then for the screen to stop changing.
    ohif.b.wait(CINE_LOADED, 120, "every phase of the cine loaded")
    pixels = {}  # (phase group, slice index) -> pixels of each segment's colour
    for g in (group, 1 if group != 1 else 2):
        for k in range(6):
            ohif.b.js(f"{SHOW}({g}, {k})")
            pixels[g, k] = _settled_colour_pixels(ohif, box, colours)
    best = max(range(6), key=lambda k: min(pixels[group, k]))
    ohif.b.js(f"{SHOW}({group}, {best})")
    time.sleep(1.0)
    png = ohif.screenshot("viewer-cardiac-seg")
    return {"series": series, "panel": text, "state": state, "png": png, "colours": colours, "seg": seg,
            "group": group, "pixels": pixels, "seg_uids": seg_uids, "viewport": ohif.viewport_text()}


def _node_outputs(work: Path, modality: str) -> list:
    found = [dcmread(p) for p in sorted((work / "node" / "data" / "outgoing").glob("job-*/*.dcm"))]
    return [ds for ds in found if ds.Modality == modality]


def test_cine_study_lists_every_result_series(cardiac_seg):
    assert cardiac_seg["series"][0] == "MR SA cine (synthetic)"
    assert sorted(cardiac_seg["series"]) == [
        "MR SA cine (synthetic)", f"OT AI cardiac summary {CARDIAC_MODEL}",
        f"SEG AI cardiac SEG ED {CARDIAC_MODEL}", f"SEG AI cardiac SEG ES {CARDIAC_MODEL}",
        f"SR AI cardiac function {CARDIAC_MODEL}"]


def test_seg_segments_are_listed_by_name_and_decoded_onto_the_cine(cardiac_seg):
    panel = cardiac_seg["panel"]
    assert f"AI cardiac SEG ES {CARDIAC_MODEL}" in panel
    positions = [panel.index(name) for name in SEGMENTS]
    assert positions == sorted(positions), panel
    state = cardiac_seg["state"]
    assert state["labels"] == SEGMENTS
    # OHIF mapped the SEG frames onto the cine's images: every segment has voxels,
    # on one image per slice (6 of the 6 x 8 cine images: those of the SEG's phase).
    assert sorted(state["counts"]) == ["1", "2", "3"] and min(state["counts"].values()) > 50, state
    assert len(state["frames"]) == 6 and len({i % 8 for i in state["frames"]}) == 1, state


def test_seg_is_drawn_over_the_cine_in_its_recommended_colours(cardiac_seg):
    assert "TriggerTime" in cardiac_seg["viewport"]  # OHIF shows the cine as 8 phases
    # Every segment is drawn at the SEG's phase: its colour's outline and fill are on the screen.
    group, pixels = cardiac_seg["group"], cardiac_seg["pixels"]
    assert max(min(pixels[group, k]) for k in range(6)) > 150, (cardiac_seg["colours"], pixels)
    # ... in the colour the SEG recommends (CIELab), so the same in every viewer.
    from highdicom.color import CIELabColor
    recommended = {s.SegmentLabel: CIELabColor.from_dicom_value(s.RecommendedDisplayCIELabValue).to_rgb()
                   for s in cardiac_seg["seg"].SegmentSequence}
    for name, shown in zip(SEGMENTS, cardiac_seg["colours"], strict=False):
        assert max(abs(a - b) for a, b in zip(recommended[name], shown, strict=False)) <= 8, (name, recommended[name], shown)


@pytest.mark.xfail(strict=True, reason=(
    "OHIF 3.13.2 puts the SEG of a multi-phase cine (shown as a 4D volume) into a 3D labelmap: "
    "it is drawn on one slice of six only, and on all eight phases alike, although its frames "
    "reference the right images (one per slice, all of one phase) by SOP Instance UID"))
def test_seg_is_drawn_on_every_slice_of_its_phase_only(cardiac_seg):
    group, pixels = cardiac_seg["group"], cardiac_seg["pixels"]
    assert all(min(pixels[group, k]) > 50 for k in range(6)), pixels
    assert not any(max(v) > 50 for (g, _), v in pixels.items() if g != group), pixels


def test_both_phase_segs_can_be_opened(cardiac_seg, pacs):
    # OHIF 3.13.2 makes one SEG display set per series, from its last instance
    # only (cornerstone-dicom-seg, _getDisplaySetsFromSeries): each phase's SEG
    # is in a series of its own, so both are there to open.
    segs = _node_outputs(pacs[2], "SEG")
    assert len({ds.SeriesInstanceUID for ds in segs}) == 2
    assert sorted(cardiac_seg["seg_uids"]) == sorted(ds.SOPInstanceUID for ds in segs)


SR_STATE = """(() => {
  const one = x => Array.isArray(x) ? x[0] : x;
  const ds = window.services.displaySetService.getActiveDisplaySets().find(d => d.Modality === 'SR');
  if (!ds || !ds.instance) return null;
  const nums = [];
  const walk = items => (Array.isArray(items) ? items : items ? [items] : []).forEach(item => {
    if (item.ValueType === 'NUM') {
      const mv = one(item.MeasuredValueSequence);
      nums.push([one(item.ConceptNameCodeSequence).CodeMeaning, Number(mv.NumericValue),
                 one(mv.MeasurementUnitsCodeSequence).CodeValue]);
    }
    walk(item.ContentSequence);
  });
  walk(ds.instance.ContentSequence);
  return {loaded: ds.isLoaded, groups: (ds.measurements || []).map(m => m.TrackingIdentifier),
          with_geometry: (ds.measurements || []).filter(m => m.coords && m.coords.length).length,
          shown: (ds.measurements || []).filter(m => m.loaded).length, nums};
})()"""


@pytest.fixture(scope="module")
def cardiac_sr(ohif, pacs, cardiac_seg):
    ohif.show("SR")
    state = ohif.b.wait(f"(s => s && s.loaded && s)({SR_STATE})", 60, "the SR loaded")
    text = ohif.panel("trackedMeasurements-btn")
    time.sleep(1.0)
    png = ohif.screenshot("viewer-cardiac-sr", error_allowed=True)
    return {"state": state, "panel": text, "png": png, "error": ohif.error()}


def test_sr_measurements_reach_the_viewer_with_values_and_units(cardiac_sr):
    state = cardiac_sr["state"]
    assert state["groups"][:2] == ["left ventricle", "right ventricle"], state
    nums = {(name, unit): value for name, value, unit in state["nums"]}
    lvef = nums[("Left ventricular ejection fraction by MR", "%")]
    assert 20 < lvef < 80
    assert nums[("Left Ventricular ED Volume", "ml")] > nums[("Left Ventricular ES Volume", "ml")] > 0
    assert ("Left Ventricular ED Volume", "ml/m2") in nums and ("Left Ventricle Mass", "g") in nums


def test_sr_measurement_panel_shows_what_ohif_can_show(cardiac_sr):
    # OHIF's measurement panel lists only measurements with SCOORD/SCOORD3D
    # geometry; the TID 1500 groups of whole-heart indices have none, so it
    # lists none of them and says so (console: "not rehydratable").
    assert cardiac_sr["state"]["with_geometry"] == cardiac_sr["state"]["shown"] == 0
    assert "Measurements (0)" in cardiac_sr["panel"] and "No tracked measurements" in cardiac_sr["panel"]


@pytest.mark.xfail(strict=True, reason=(
    "OHIF 3.13.2 lists SR measurements only when they carry image coordinates (SCOORD); "
    "LVEF, LVEDV... are whole-study indices without any"))
def test_sr_measurement_panel_lists_lvef(cardiac_sr):
    assert "Left ventricular ejection fraction" in cardiac_sr["panel"]


@pytest.mark.xfail(strict=True, reason=(
    "OHIF 3.13.2 makes a measurement of every TID 1500 measurement group, with or without "
    "geometry, then reads measurement.coords[0].ReferencedSOPSequence without a check "
    "(_checkIfCanAddMeasurementsToDisplaySet): a TypeError, shown as 'Something went wrong'"))
def test_cardiac_sr_opens_without_an_error(cardiac_sr):
    assert cardiac_sr["error"] is None, cardiac_sr["error"]


def test_cardiac_summary_capture_loads(ohif, pacs, cardiac_sr):
    # Opened as its own first display set: dropped into the cine's 4D (volume)
    # viewport instead, OHIF 3.13.2 fails on any 2D capture without geometry
    # ("Error compiling volume mapper shader": a NaN spacing) and shows an error.
    [sc] = [ds for ds in _node_outputs(pacs[2], "OT") if "summary" in ds.SeriesDescription]
    ohif.open(pacs[1]["cine"], initial_series=sc.SeriesInstanceUID)
    ohif.b.wait("document.querySelector('[data-cy=viewport-pane]').innerText.includes('AI cardiac summary')",
                60, "the summary capture in the viewport")
    # Its coloured contours and yellow text: the capture is rendered, in colour.
    png = ohif.wait_pixels(lambda png: coloured_fraction(png, ohif.viewport_box((10, 130, 20, 60))) > 0.01,
                           "the summary capture in colour")
    ohif.assert_no_error()
    (ohif.work / "viewer-cardiac-sc.png").write_bytes(png)
    if SAVE_DOCS:
        save_small_png(png, DOCS / "viewer-cardiac-sc.png")


# --- CT: denoised series and SR -----------------------------------------------

def test_ct_denoised_series_loads(ohif, pacs):
    # Opened on the denoised series (a double-click onto the original's viewport
    # while it is still loading sometimes leaves OHIF's camera at a dot).
    denoised = _node_outputs(pacs[2], "CT")[0].SeriesInstanceUID
    series = ohif.open(pacs[1]["ct"], initial_series=denoised)
    assert series == ["CT Cardiac CTA low dose (synthetic)", f"CT AI denoised {CT_MODEL}",
                      f"SR AI denoising image quality {CT_MODEL}"]
    ohif.b.wait("document.querySelector('[data-cy=viewport-pane]').innerText.includes('AI denoised')", 60,
                "the denoised series in the viewport")
    ohif.b.wait("(v => v.getImageIds?.().length === 8 && v.getCurrentImageId())"
                "(window.cornerstone.getEnabledElements()[0].viewport)", 60, "8 denoised images")
    assert "I:" in ohif.viewport_text() and "/8" in ohif.viewport_text()

    def rendered(png: bytes) -> bool:  # an image, not a blank viewport
        import io

        from PIL import Image
        return np.asarray(Image.open(io.BytesIO(png)).convert("L").crop(
            ohif.viewport_box((40, 120, 40, 60)))).std() > 20

    ohif.wait_pixels(rendered, "the denoised image drawn")
    time.sleep(0.5)
    ohif.screenshot("viewer-ct")


@pytest.fixture(scope="module")
def ct_sr(ohif, pacs):
    ohif.open(pacs[1]["ct"])
    ohif.wait_first_image()
    ohif.show("SR AI denoising")
    state = ohif.b.wait(f"(s => s && s.loaded && s)({SR_STATE})", 60, "the SR loaded")
    text = ohif.panel("trackedMeasurements-btn")
    time.sleep(1.0)
    ohif.screenshot("viewer-ct-sr", error_allowed=True)
    return {"state": state, "panel": text, "error": ohif.error()}


def test_ct_sr_opens_without_an_error(ct_sr):
    assert ct_sr["error"] is None, ct_sr["error"]


def test_ct_sr_measurements_reach_the_viewer(ct_sr):
    state = ct_sr["state"]
    assert state["groups"] == [f"{roi}, {series} series" for series in ("original", "denoised")
                               for roi in ("blood ROI", "reference ROI", "noise, SNR and CNR")], state
    units = {(name, unit) for name, _, unit in state["nums"]}
    assert ("Mean", "[hnsf'U]") in units and ("Standard Deviation", "[hnsf'U]") in units
    # Every group has geometry: the ROIs their circles, the noise groups the
    # circles their values are inferred from; so OHIF places them on their
    # images and draws them (it failed on the first group without any before).
    assert state["with_geometry"] == 6, state
    assert state["shown"] >= 2, state


@pytest.mark.xfail(strict=True, reason=(
    "OHIF 3.13.2 draws the CT SR's ROIs over their images in its read-only SR display, but lists "
    "measurements in its panel only for an SR it can hydrate into its own tools (isRehydratable: "
    "a tracking identifier or graphic code of one of its tool adapters, such as "
    "'cornerstoneTools@^4.0.0:CircleROI')"))
def test_ct_sr_roi_measurements_are_listed_with_hu(ct_sr):
    assert "Mean" in ct_sr["panel"] and "HU" in ct_sr["panel"], ct_sr["panel"]


# --- CXR: heat map capture and SR ----------------------------------------------

def test_cxr_heat_map_capture_loads_in_colour(ohif, pacs):
    series = ohif.open(pacs[1]["cxr"])
    ohif.wait_first_image()
    assert series == ["DX Chest PA (synthetic)", f"OT AI CXR triage heat map {CXR_MODEL}",
                      f"SR AI CXR triage {CXR_MODEL}"]
    before = coloured_fraction(ohif.b.screenshot(), ohif.viewport_box((10, 10, 20, 40)))
    ohif.show("OT AI CXR triage heat map")
    ohif.b.wait("document.querySelector('[data-cy=viewport-pane]').innerText.includes('heat map')", 60,
                "the heat map in the viewport")
    ohif.wait_pixels(lambda png: coloured_fraction(png, ohif.viewport_box((10, 10, 20, 40))) > 0.02,
                     "the heat map in colour")
    time.sleep(1.0)
    png = ohif.screenshot("viewer-cxr")
    after = coloured_fraction(png, ohif.viewport_box((10, 10, 20, 40)))
    # Grey before, colour after: this also proves the colour measure itself.
    assert before < 0.001 and after > 0.02, (before, after)


SR_WORDS = """(() => {
  const one = x => Array.isArray(x) ? x[0] : x;
  const ds = window.services.displaySetService.getActiveDisplaySets().find(d => d.Modality === 'SR');
  if (!ds || !ds.instance || !ds.isLoaded) return null;
  const items = [];
  const walk = list => (Array.isArray(list) ? list : list ? [list] : []).forEach(item => {
    const name = one(item.ConceptNameCodeSequence);
    if (item.ValueType === 'TEXT') items.push([name.CodeMeaning, item.TextValue]);
    if (item.ValueType === 'CODE') items.push([name.CodeMeaning, one(item.ConceptCodeSequence).CodeMeaning]);
    walk(item.ContentSequence);
  });
  walk(ds.instance.ContentSequence);
  return items;
})()"""


@pytest.fixture(scope="module")
def cxr_sr(ohif, pacs):
    ohif.open(pacs[1]["cxr"])
    ohif.wait_first_image()
    ohif.show("SR AI CXR triage")
    words = ohif.b.wait(f"(s => s && s.length && s)({SR_WORDS})", 60, "the CXR SR loaded")
    time.sleep(1.0)
    ohif.screenshot("viewer-cxr-sr", error_allowed=True)
    return {"words": words, "error": ohif.error()}


def test_cxr_sr_opens_without_an_error(cxr_sr):
    # OHIF 3.13.2 fails on a measurement group without image coordinates
    # (_checkIfCanAddMeasurementsToDisplaySet reads coords[0]); the probability
    # is inferred from the radiograph's outline, so OHIF draws it there, with
    # the SR's Comment (the disclaimer) as its label.
    assert cxr_sr["error"] is None, cxr_sr["error"]


def test_cxr_sr_reaches_the_viewer_with_its_finding_and_disclaimer(cxr_sr):
    # The SR as OHIF loaded it: the finding in standard codes and the wording
    # in TEXT items, which OHIF's SR display lists as they are.
    words = {name: value for name, value in cxr_sr["words"]}
    assert words["Finding"] == "Abnormal" and words["Normality"] == "Abnormal", words
    assert words["Recommendation"] == "Abnormal - needs review"
    assert words["Comment"].startswith("AI triage aid, not a diagnosis"), words
