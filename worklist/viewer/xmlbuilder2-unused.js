// Stands in for xmlbuilder2 in the bundle. vtk.js's XML reader and writer import it (through Cornerstone's mesh
// cache, which reads VTK XML poly data); the stack viewer never reads or writes VTK XML, and xmlbuilder2 requires
// Node's "events" and "url" modules, which a browser bundle does not have. Reaching this is a bug: say so.
export function create() {
  throw new Error("VTK XML is not supported in the worklist viewer (xmlbuilder2 is left out of the bundle)");
}
