// The worklist's stack viewer: a Cornerstone3D StackViewport fed by the gateway's WADO-RS (worklist/wado.py).
// Bundled by scripts/bootstrap.sh with esbuild into viewer.bundle.js (an IIFE that sets window.RaddraftViewer);
// study.js drives it: the series' slices, scrolling, window presets, zoom, pan, and the AI boxes drawn over it.
//
// Images are "raddraft:<frames URL>" ids: the loader below fetches the frame (multipart/related, uncompressed
// little endian), turns stored values into modality values (Rescale Slope/Intercept) and hands Cornerstone a
// pre-scaled image; the metadata provider answers from the series' DICOM JSON (…/metadata).
import {
  Enums,
  RenderingEngine,
  getRenderingEngine,
  getShouldUseCPURendering,
  imageLoader,
  init as initCore,
  metaData,
  utilities,
} from "@cornerstonejs/core";
import {
  Enums as ToolEnums,
  PanTool,
  StackScrollTool,
  ToolGroupManager,
  WindowLevelTool,
  ZoomTool,
  addTool,
  init as initTools,
} from "@cornerstonejs/tools";

const SCHEME = "raddraft";
const ENGINE_ID = "raddraft-engine";
const TOOL_GROUP_ID = "raddraft-tools";
const modules = new Map(); // imageId -> {module name -> value}
let started = false;

// ------------------------------------------------------------------ DICOM JSON

function first(dataset, tag) {
  const element = dataset && dataset[tag];
  return element && element.Value ? element.Value[0] : undefined;
}

function all(dataset, tag) {
  const element = dataset && dataset[tag];
  return element && element.Value ? element.Value : undefined;
}

// the attributes of one frame: the top level, then the shared and the frame's functional groups (which win)
function frameAttribute(dataset, frameIndex, macro, tag) {
  const perFrame = all(dataset, "52009230");
  const shared = first(dataset, "52009229");
  for (const groups of [perFrame && perFrame[frameIndex], shared]) {
    const item = groups && first(groups, macro);
    if (item && item[tag] && item[tag].Value) return item[tag].Value;
  }
  return all(dataset, tag);
}

function numbers(values) {
  return values ? values.map(Number) : undefined;
}

function describe(dataset, frameIndex) {
  const rows = Number(first(dataset, "00280010"));
  const columns = Number(first(dataset, "00280011"));
  const spacing = numbers(frameAttribute(dataset, frameIndex, "00289110", "00280030")) || [1, 1];
  const orientation = numbers(frameAttribute(dataset, frameIndex, "00209116", "00200037")) || [1, 0, 0, 0, 1, 0];
  const position = numbers(frameAttribute(dataset, frameIndex, "00209113", "00200032")) || [0, 0, 0];
  const slope = Number((frameAttribute(dataset, frameIndex, "00289145", "00281053") || [1])[0]);
  const intercept = Number((frameAttribute(dataset, frameIndex, "00289145", "00281052") || [0])[0]);
  const centers = numbers(frameAttribute(dataset, frameIndex, "00289132", "00281050"));
  const widths = numbers(frameAttribute(dataset, frameIndex, "00289132", "00281051"));
  const samples = Number(first(dataset, "00280002") || 1);
  const pixel = {
    samplesPerPixel: samples,
    photometricInterpretation: first(dataset, "00280004") || "MONOCHROME2",
    rows, columns,
    bitsAllocated: Number(first(dataset, "00280100")),
    bitsStored: Number(first(dataset, "00280101")),
    highBit: Number(first(dataset, "00280102")),
    pixelRepresentation: Number(first(dataset, "00280103") || 0),
    planarConfiguration: 0,
  };
  return {
    imagePixelModule: pixel,
    imagePlaneModule: {
      frameOfReferenceUID: first(dataset, "00200052"),
      rows, columns,
      imageOrientationPatient: orientation,
      rowCosines: orientation.slice(0, 3),
      columnCosines: orientation.slice(3, 6),
      imagePositionPatient: position,
      pixelSpacing: spacing,
      rowPixelSpacing: spacing[0],
      columnPixelSpacing: spacing[1],
      sliceThickness: Number(first(dataset, "00180050") || 0) || undefined,
    },
    modalityLutModule: { rescaleSlope: slope, rescaleIntercept: intercept, rescaleType: first(dataset, "00281054") },
    voiLutModule: { windowCenter: centers, windowWidth: widths },
    generalSeriesModule: { modality: first(dataset, "00080060"), seriesInstanceUID: first(dataset, "0020000E") },
    generalImageModule: { instanceNumber: Number(first(dataset, "00200013") || 0) },
    sopCommonModule: { sopInstanceUID: first(dataset, "00080018"), sopClassUID: first(dataset, "00080016") },
  };
}

// ------------------------------------------------------------------ the image loader

function parseMultipart(buffer, contentType) {
  const match = /boundary="?([^";]+)"?/i.exec(contentType || "");
  if (!match) throw new Error("the frame response is not multipart/related: " + contentType);
  const bytes = new Uint8Array(buffer);
  const text = new TextDecoder("latin1").decode(bytes.subarray(0, Math.min(bytes.length, 4096)));
  const start = text.indexOf("\r\n\r\n", text.indexOf("--" + match[1]));
  if (start < 0) throw new Error("the frame response has no part");
  const delimiter = new TextEncoder().encode("\r\n--" + match[1]);
  let end = bytes.length - delimiter.length;
  for (; end > start; end--) {  // the closing delimiter is at the end: search backwards
    let found = true;
    for (let i = 0; i < delimiter.length && found; i++) found = bytes[end + i] === delimiter[i];
    if (found) break;
  }
  return buffer.slice(start + 4, end);
}

function typedPixels(raw, pixel) {
  if (pixel.bitsAllocated === 8) return new Uint8Array(raw);
  if (pixel.bitsAllocated === 16) return pixel.pixelRepresentation ? new Int16Array(raw) : new Uint16Array(raw);
  if (pixel.bitsAllocated === 32) return pixel.pixelRepresentation ? new Int32Array(raw) : new Uint32Array(raw);
  throw new Error("Bits Allocated " + pixel.bitsAllocated + " is not supported by the viewer");
}

function loadImage(imageId) {
  const promise = (async () => {
    const url = imageId.slice(SCHEME.length + 1);
    const response = await fetch(url, {
      credentials: "same-origin",
      headers: { Accept: 'multipart/related; type="application/octet-stream"' },
    });
    if (!response.ok) throw new Error("frame " + url + ": HTTP " + response.status);
    const raw = parseMultipart(await response.arrayBuffer(), response.headers.get("content-type"));
    const meta = modules.get(imageId);
    if (!meta) throw new Error("no metadata for " + imageId);
    const pixel = meta.imagePixelModule;
    const stored = typedPixels(raw, pixel);
    const color = pixel.samplesPerPixel === 3;
    const { rescaleSlope: slope, rescaleIntercept: intercept } = meta.modalityLutModule;
    let values = stored;
    if (!color) {  // modality values (HU for CT), so that a window preset is a range of them
      values = new Float32Array(stored.length);
      for (let i = 0; i < stored.length; i++) values[i] = stored[i] * slope + intercept;
    } else if (!(stored instanceof Uint8Array)) {
      throw new Error("colour images must have 8 bits per sample");
    }
    let min = Infinity;
    let max = -Infinity;
    for (let i = 0; i < values.length; i++) {
      if (values[i] < min) min = values[i];
      if (values[i] > max) max = values[i];
    }
    meta.range = [min, max];
    const { rows, columns } = pixel;
    const voxelManager = utilities.VoxelManager.createImageVoxelManager({
      width: columns, height: rows, scalarData: values, numberOfComponents: color ? 3 : 1, id: imageId,
    });
    const plane = meta.imagePlaneModule;
    const voi = meta.voiLutModule;
    const range = Math.max(max - min, 1);
    return {
      imageId,
      minPixelValue: min,
      maxPixelValue: max,
      slope: 1,
      intercept: 0,
      windowCenter: voi.windowCenter ? voi.windowCenter[0] : (min + max) / 2,
      windowWidth: voi.windowWidth ? voi.windowWidth[0] : range,
      voiLUTFunction: undefined,
      getPixelData: () => voxelManager.getScalarData(),
      getCanvas: undefined,
      rows, columns, height: rows, width: columns,
      color, rgba: false, numberOfComponents: color ? 3 : 1,
      columnPixelSpacing: plane.columnPixelSpacing,
      rowPixelSpacing: plane.rowPixelSpacing,
      invert: pixel.photometricInterpretation === "MONOCHROME1",
      photometricInterpretation: pixel.photometricInterpretation,
      sizeInBytes: values.byteLength,
      dataType: values.constructor.name,
      isPreScaled: !color,
      preScale: { enabled: !color, scaled: !color, scalingParameters: { rescaleSlope: slope, rescaleIntercept: intercept,
        modality: meta.generalSeriesModule.modality } },
      FrameOfReferenceUID: plane.frameOfReferenceUID,
      voxelManager,
    };
  })();
  return { promise };
}

function provider(type, imageId) {
  const meta = modules.get(imageId);
  return meta ? meta[type] : undefined;
}

// ------------------------------------------------------------------ the viewer

function start() {
  if (started) return;
  initCore();
  initTools();
  imageLoader.registerImageLoader(SCHEME, loadImage);
  metaData.addProvider(provider, 10000);
  for (const tool of [StackScrollTool, ZoomTool, PanTool, WindowLevelTool]) addTool(tool);
  started = true;
}

// one frame of the series' metadata: the image id of its frames URL and what Cornerstone asks of it
function registerFrame(wadoRoot, dataset, frameNumber) {
  const series = first(dataset, "0020000E");
  const sop = first(dataset, "00080018");
  const imageId = SCHEME + ":" + wadoRoot + "/series/" + series + "/instances/" + sop + "/frames/" + frameNumber;
  modules.set(imageId, describe(dataset, frameNumber - 1));
  return imageId;
}

class StackViewer {
  // element: the div Cornerstone renders into
  constructor(element) {
    start();
    this.element = element;
    this.engine = getRenderingEngine(ENGINE_ID) || new RenderingEngine(ENGINE_ID);
    this.viewportId = "raddraft-stack";
    this.engine.enableElement({ viewportId: this.viewportId, type: Enums.ViewportType.STACK, element });
    this.viewport = this.engine.getViewport(this.viewportId);
    this.tools = ToolGroupManager.getToolGroup(TOOL_GROUP_ID) || ToolGroupManager.createToolGroup(TOOL_GROUP_ID);
    for (const tool of [StackScrollTool, ZoomTool, PanTool, WindowLevelTool]) this.tools.addTool(tool.toolName);
    const { MouseBindings, KeyboardBindings } = ToolEnums;
    this.tools.setToolActive(StackScrollTool.toolName, { bindings: [{ mouseButton: MouseBindings.Wheel }] });
    this.tools.setToolActive(ZoomTool.toolName, { bindings: [
      { mouseButton: MouseBindings.Wheel, modifierKey: KeyboardBindings.Ctrl },
      { mouseButton: MouseBindings.Secondary }] });
    this.tools.setToolActive(PanTool.toolName, { bindings: [{ mouseButton: MouseBindings.Primary }] });
    this.tools.setToolActive(WindowLevelTool.toolName, { bindings: [{ mouseButton: MouseBindings.Auxiliary }] });
    this.tools.addViewport(this.viewportId, ENGINE_ID);
    this.imageIds = [];
  }

  // the image ids of a series' metadata, one per frame, in the order *order* gives ([sop, frame] pairs)
  imageIdsFor(wadoRoot, instances, order) {
    const bySop = new Map(instances.map((d) => [first(d, "00080018"), d]));
    return order.map(([sop, frame]) => {
      const dataset = bySop.get(sop);
      if (!dataset) throw new Error("instance " + sop + " is not in the series metadata");
      return registerFrame(wadoRoot, dataset, frame || 1);
    });
  }

  async setStack(imageIds, index) {
    this.imageIds = imageIds;
    await this.viewport.setStack(imageIds, index);
    this.viewport.render();
  }

  index() { return this.viewport.getCurrentImageIdIndex(); }

  async setIndex(index) {
    const clamped = Math.max(0, Math.min(this.imageIds.length - 1, index));
    if (clamped !== this.index()) await this.viewport.setImageIdIndex(clamped);
    return clamped;
  }

  // {lower, upper} of modality values; null: the image's own window (its first VOI, else its range). Not
  // resetProperties(): it would apply a MONOCHROME1 image's inversion a second time.
  setWindow(range) {
    this.viewport.setProperties({ voiRange: range || this.ownWindow() });
    this.viewport.render();
  }

  ownWindow() {
    const meta = modules.get(this.viewport.getCurrentImageId());
    const { windowCenter: centers, windowWidth: widths } = meta.voiLutModule;
    if (centers && widths && centers.length && widths.length) {  // the DICOM linear function (PS3.3 C.11.2.1.2)
      return { lower: centers[0] - 0.5 - (widths[0] - 1) / 2, upper: centers[0] - 0.5 + (widths[0] - 1) / 2 };
    }
    return { lower: meta.range[0], upper: meta.range[1] };
  }

  voiRange() { return this.viewport.getProperties().voiRange; }

  zoomBy(factor) {
    this.viewport.setZoom(this.viewport.getZoom() * factor);
    this.viewport.render();
  }

  zoom() { return this.viewport.getZoom(); }

  fit() {
    this.viewport.resetCamera();
    this.viewport.render();
  }

  resize() { this.engine.resize(true, true); }

  // a point of the current image (source pixels, [0, 0] the top-left corner of the top-left pixel) on the canvas
  imageToCanvas(point) {
    const imageId = this.viewport.getCurrentImageId();
    return this.viewport.worldToCanvas(utilities.imageToWorldCoords(imageId, point));
  }

  renderer() { return getShouldUseCPURendering() ? "cpu" : "gpu"; }

  onRender(callback) {
    this.element.addEventListener(Enums.Events.IMAGE_RENDERED, callback);
  }

  onNewImage(callback) {
    this.element.addEventListener(Enums.Events.STACK_NEW_IMAGE, callback);
  }
}

window.RaddraftViewer = { StackViewer };
