/* medcam report: one case in NiiVue. Data: window.MEDCAM_CASE (data/<case>.js); library: window.niivue (UMD). */
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
  let scanVol = null, mapVol = null, regionVol = null, current = null;
  const thr = document.getElementById("threshold"), thrText = document.getElementById("thr-value");
  const opac = document.getElementById("opacity"), outl = document.getElementById("outlines");
  const scanSel = document.getElementById("scan");
  const scaleMax = D.scale[1];

  function load(entry, opts) {
    return NV.NVImage.loadFromBase64(Object.assign({ base64: entry.b64, name: entry.name }, opts));
  }
  function threshold() { return (Number(thr.value) / 1000) * scaleMax; }
  function applyMapDisplay() {
    if (!mapVol) return;
    const t = threshold();
    thrText.textContent = t.toPrecision(3);
    mapVol.cal_min = Math.max(t, scaleMax * 1e-6);
    mapVol.cal_max = scaleMax;
    mapVol.opacity = Number(opac.value) / 100;
    nv.updateGLVolume();
  }
  function order() {
    const vols = [scanVol, mapVol, outl.checked ? regionVol : null].filter(Boolean);
    for (const v of nv.volumes.slice()) if (!vols.includes(v)) nv.removeVolume(v);
    for (const v of vols) if (!nv.volumes.includes(v)) nv.addVolume(v);
    vols.forEach((v, i) => nv.setVolume(v, i));
  }
  async function showScan(ch) {
    const entry = D.scans.find((s) => s.channel === ch) || D.scans[0];
    scanVol = await load(entry, { colormap: "gray", cal_min: entry.cal_min, cal_max: entry.cal_max, colorbarVisible: false });
    order(); applyMapDisplay();
  }
  async function showMap(i) {
    const entry = D.maps[i];
    current = i;
    mapVol = await load(entry, { colormap: "turbo", cal_min: scaleMax * 1e-6, cal_max: scaleMax, opacity: 0.7 });
    document.querySelectorAll("#map-buttons button").forEach((b) => b.classList.toggle("on", Number(b.dataset.i) === i));
    say(entry.method_label + " | target " + entry.target + " | map max " + entry.max.toPrecision(3) +
        (entry.max > 0 ? "" : " | map is zero"));
    order(); applyMapDisplay();
    const c = (D.centres_mm || {})[entry.target];  // the slices of the PNGs: the ROI's centre of mass
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
          b.textContent = "max " + D.maps[i].max.toPrecision(3);
          b.addEventListener("click", () => showMap(i));
          td.appendChild(b);
        }
        tr.appendChild(td);
      }
      tbl.appendChild(tr);
    }
    box.appendChild(tbl);
  }
  async function main() {
    await nv.attachTo("gl");
    nv.setSliceType(nv.sliceTypeMultiplanar);
    for (const s of D.scans) {
      const o = document.createElement("option"); o.value = s.channel; o.textContent = s.channel;
      if (s.channel === D.background) o.selected = true;
      scanSel.appendChild(o);
    }
    buttons();
    if (D.regions) {
      regionVol = await load(D.regions, { colorbarVisible: false, opacity: 1 });
      const n = D.regions.labels.length, pal = [[0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 255, 0], [255, 128, 0]];
      const R = [0], G = [0], B = [0], A = [0], I = [0];
      for (let k = 0; k < n; k++) { const c = pal[k % pal.length]; R.push(c[0]); G.push(c[1]); B.push(c[2]); A.push(0); I.push(k + 1); }
      regionVol.setColormapLabel({ R, G, B, A, I, labels: ["background"].concat(D.regions.labels) });
      nv.setAtlasOutline(1);
      document.getElementById("legend").textContent = "Outlines: " + D.regions.labels.map((l, k) =>
        l + " (" + ["cyan", "magenta", "yellow", "green", "orange"][k % 5] + ")").join(", ") + ".";
    } else {
      outl.disabled = true;
    }
    await showScan(D.background);
    let first = 0;  // start with the strongest map (the others are one click away)
    D.maps.forEach((m, i) => { if (m.max > D.maps[first].max) first = i; });
    if (D.maps.length) await showMap(first);
    thr.addEventListener("input", applyMapDisplay);
    opac.addEventListener("input", applyMapDisplay);
    outl.addEventListener("change", () => { order(); nv.updateGLVolume(); });
    scanSel.addEventListener("change", () => showScan(scanSel.value));
    document.body.dataset.ready = "1";
  }
  main().catch((e) => { say("viewer error: " + e); console.error(e); });
})();
