/* medcam report: one case in NiiVue. Data: window.MEDCAM_CASE (data/<case>.js: display spec, records, regions);
   each scan / map volume in data/<case>/<key>.js, loaded by a <script> tag when first shown; library: window.niivue. */
(function () {
  "use strict";
  const D = window.MEDCAM_CASE;
  const status = document.getElementById("status");
  const say = (t) => { if (status) status.textContent = t; };
  if (!D || !window.niivue) { say("viewer data or NiiVue bundle missing"); return; }
  if (!D.scans.length) {  // explained with --no-png --no-slicer and the original files moved away
    say("no scan found for this case (neither slicer/image_* nor the original files): the maps cannot be shown");
    document.body.dataset.ready = "1";
    return;
  }
  const NV = window.niivue;
  const nv = new NV.Niivue({
    isColorbar: true,
    isRadiologicalConvention: true,
    backColor: [0, 0, 0, 1],
    crosshairColor: [0.3, 0.8, 1, 0.35],
    crosshairWidth: 0.5,
    dragAndDropEnabled: false,
    multiplanarShowRender: 0,
    sagittalNoseLeft: true,
    logLevel: "error",
  });
  // volumes on demand: data/<case>/<key>.js calls window.MEDCAM_VOLUME(key, entry)
  const pending = {}, cache = {};
  window.MEDCAM_VOLUME = (key, entry) => { if (pending[key]) { pending[key](entry); delete pending[key]; } };
  function fetchVolume(key) {
    if (cache[key]) return cache[key];
    cache[key] = new Promise((resolve, reject) => {
      pending[key] = resolve;
      const s = document.createElement("script");
      s.src = "../data/" + encodeURIComponent(D.case_id) + "/" + key + ".js";
      s.onerror = () => reject(new Error("cannot load " + s.src));
      document.head.appendChild(s);
    });
    return cache[key];
  }
  let scanVol = null, scanChannel = null, mapVol = null, current = null;
  const regionVols = [];
  const thr = document.getElementById("threshold"), thrText = document.getElementById("thr-value");
  const opac = document.getElementById("opacity"), outl = document.getElementById("outlines");
  const scanSel = document.getElementById("scan");

  function load(entry, opts) {
    return NV.NVImage.loadFromBase64(Object.assign({ base64: entry.b64, name: entry.name }, opts));
  }
  function colormapOf(lut) {  // the display spec's LUT (RGBA 0..1, ramp in alpha) as a NiiVue colour map
    const c = { R: [], G: [], B: [], A: [], I: [] };
    lut.forEach((e, i) => {
      c.R.push(Math.round(255 * e[0])); c.G.push(Math.round(255 * e[1])); c.B.push(Math.round(255 * e[2]));
      c.A.push(Math.round(255 * e[3])); c.I.push(i);
    });
    return c;
  }
  const mapScale = () => (current === null ? [0, 1] : D.maps[current].scale);
  function threshold() { const s = mapScale(); return s[0] + (Number(thr.value) / 1000) * (s[1] - s[0]); }
  function applyMapDisplay() {
    if (!mapVol) return;
    const s = mapScale(), t = threshold();
    thrText.textContent = t.toPrecision(3);
    mapVol.cal_min = Math.max(t, s[0] + (s[1] - s[0]) * 1e-6);
    mapVol.cal_max = s[1];
    mapVol.opacity = Number(opac.value) / 100;
    nv.updateGLVolume();
  }
  function order() {  // one GL refresh for the whole stack (per-volume add/set calls refresh every layer each time)
    const vols = [scanVol, mapVol].concat(outl.checked ? regionVols : []).filter(Boolean);
    if (vols.length === nv.volumes.length && vols.every((v, i) => nv.volumes[i] === v)) return;
    nv.volumes = vols;
    nv.back = vols[0] || null;
    nv.overlays = vols.slice(1);
    nv.updateGLVolume();
  }
  async function showScan(ch, window_) {
    const rec = D.scans.find((s) => s.channel === ch) || D.scans[0];
    const entry = await fetchVolume(rec.key);
    const w = window_ || [rec.cal_min, rec.cal_max];
    if (scanChannel !== rec.channel) {
      scanVol = await load(entry, { colormap: "gray", cal_min: w[0], cal_max: w[1], colorbarVisible: false });
      scanChannel = rec.channel;
    } else { scanVol.cal_min = w[0]; scanVol.cal_max = w[1]; }
    scanSel.value = rec.channel;
    order(); applyMapDisplay();
  }
  async function showMap(i) {
    const rec = D.maps[i];
    current = i;
    say("loading " + rec.method_label + " | " + rec.target + " ...");
    const entry = await fetchVolume(rec.key);
    mapVol = await load(entry, { colormap: "medcam", cal_min: rec.scale[1] * 1e-6, cal_max: rec.scale[1], opacity: 0.6 });
    document.querySelectorAll("#map-buttons button").forEach((b) => b.classList.toggle("on", Number(b.dataset.i) === i));
    await showScan(rec.background || D.background, rec.window);  // the target's own background and window
    say(rec.method_label + " | target " + rec.target + " | map max " + rec.max.toPrecision(3) +
        (rec.zero ? " | map is zero" : "") + " | scale 0.." + rec.scale[1].toPrecision(3) + " " + D.display.unit +
        (rec.own_scale ? " (own scale)" : ""));
    const c = rec.centre_mm;  // the slices of the PNGs
    if (c && nv.volumes.length) { nv.scene.crosshairPos = nv.mm2frac(c); nv.drawScene(); }
  }
  function buttons() {
    const box = document.getElementById("map-buttons");
    const targets = [...new Set(D.maps.map((m) => m.target))], methods = [...new Set(D.maps.map((m) => m.method))];
    const tbl = document.createElement("table");
    const head = document.createElement("tr");
    head.appendChild(document.createElement("th"));
    for (const m of methods) {
      const th = document.createElement("th");
      th.textContent = (D.maps.find((x) => x.method === m) || {}).method_label || m;
      head.appendChild(th);
    }
    tbl.appendChild(head);
    for (const t of targets) {
      const tr = document.createElement("tr");
      const th = document.createElement("th"); th.textContent = t; tr.appendChild(th);
      for (const m of methods) {
        const td = document.createElement("td");
        const i = D.maps.findIndex((x) => x.method === m && x.target === t);
        if (i >= 0) {
          const b = document.createElement("button");
          b.dataset.i = String(i);
          b.textContent = D.maps[i].zero ? "map is zero" : "max " + D.maps[i].max.toPrecision(3);
          b.addEventListener("click", () => showMap(i));
          td.appendChild(b);
        }
        tr.appendChild(td);
      }
      tbl.appendChild(tr);
    }
    box.appendChild(tbl);
  }
  async function regions() {
    const legend = document.getElementById("legend");
    if (!D.regions.length) { outl.disabled = true; return; }
    legend.appendChild(document.createTextNode("Outlines: "));
    for (const r of D.regions) {  // each region its own label volume: nested regions never overwrite each other
      // NiiVue draws a label volume's border voxels at alpha = atlasOutline (1) and its inside at the volume's
      // opacity: a near-zero opacity leaves the outline only
      const v = await load(r, { colorbarVisible: false, opacity: 0.001 });
      const rgb = r.color.map((x) => Math.round(255 * x));
      v.setColormapLabel({ R: [0, rgb[0]], G: [0, rgb[1]], B: [0, rgb[2]], A: [0, 255], I: [0, 1], labels: ["", r.label] });
      regionVols.push(v);
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.cssText = "display:inline-block;width:1em;height:0.8em;margin:0 0.3em 0 0.8em;background:#222;border:2px solid rgb(" + rgb.join(",") + ")";
      legend.appendChild(sw);
      legend.appendChild(document.createTextNode(r.label));
    }
    nv.setAtlasOutline(1);
  }
  async function main() {
    await nv.attachTo("gl");
    nv.setSliceType(nv.sliceTypeMultiplanar);
    nv.addColormap("medcam", colormapOf(D.display.lut));
    for (const s of D.scans) {
      const o = document.createElement("option"); o.value = s.channel; o.textContent = s.channel;
      scanSel.appendChild(o);
    }
    buttons();
    await regions();
    if (D.maps.length) await showMap(0); else await showScan(D.background);
    thr.addEventListener("input", applyMapDisplay);
    opac.addEventListener("input", applyMapDisplay);
    outl.addEventListener("change", () => { order(); nv.updateGLVolume(); });
    scanSel.addEventListener("change", () => showScan(scanSel.value));
    window.MEDCAM_VIEWER = { nv: nv, scan: () => scanChannel, map: () => current };  // for tests and the console
    document.body.dataset.ready = "1";
  }
  main().catch((e) => { say("viewer error: " + e); console.error(e); });
})();
