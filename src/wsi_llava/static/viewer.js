// WSI-LLaVA slide view: a canvas showing a slide's Deep Zoom pyramid (or, for a slide without a raw image,
// the grid of its tiles) with pan (drag), zoom (wheel, double-click, buttons) and an overlay of selected
// tiles coloured by score, drawn in place at every zoom. Positions are level-0 pixels throughout; the view is
// the level-0 point at the canvas' top-left corner and the scale (canvas px per level-0 px). No dependencies.
"use strict";

// viridis, 5 stops: colour of a score normalised to [0, 1] (shared with the heatmap)
const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function rampColour(t) {
  const u = Math.min(Math.max(t, 0), 1) * (RAMP.length - 1);
  const i = Math.min(Math.floor(u), RAMP.length - 2), f = u - i;
  const c = RAMP[i].map((v, k) => Math.round(v + f * (RAMP[i + 1][k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

// A DZI descriptor (XML text) -> {width, height, tileSize, overlap}
function parseDzi(text) {
  const doc = new DOMParser().parseFromString(text, "application/xml");
  const image = doc.documentElement, size = doc.getElementsByTagNameNS("*", "Size")[0];
  if (!image || image.localName !== "Image" || !size) throw new Error("the server sent an unreadable DZI descriptor");
  const info = { width: Number(size.getAttribute("Width")), height: Number(size.getAttribute("Height")),
                 tileSize: Number(image.getAttribute("TileSize")), overlap: Number(image.getAttribute("Overlap")) };
  if (!(info.width > 0 && info.height > 0 && info.tileSize > 0 && info.overlap >= 0)) {
    throw new Error("the server sent an unreadable DZI descriptor");
  }
  return info;
}

const MAX_LOADS = 6;           // tile requests in flight
const MAX_CACHED = 300;        // decoded tiles kept (≈ 80 MB of 256-px RGBA)
const MAX_ZOOM = 4;            // canvas px per level-0 px at most
const BACKDROP = "#e6e3ea", GRID_COLOUR = "#a58bc4";

class SlideView {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.view = { x: 0, y: 0, scale: 1 };
    this.overlay = [];         // [{x, y, size, colour, label}] level-0 boxes
    this.showOverlay = true;
    this.clear();
    this.bindInput();
  }

  // -- content ----------------------------------------------------------------------------------------
  clear() {
    this.image = null;         // {width, height, tileSize, overlap, maxLevel, levels: [{w, h, cols, rows}]}
    this.grid = null;          // {coords, size}
    this.bounds = null;        // {x, y, w, h}: what "fit" shows
    this.loadTile = null;      // (level, col, row) => Promise<ImageBitmap>
    if (this.cache) for (const bmp of this.cache.values()) bmp.close();
    this.cache = new Map();    // "level/col/row" -> ImageBitmap
    this.loading = new Set();
    this.failed = new Set();
    this.wanted = [];
    this.generation = (this.generation || 0) + 1;
    this.overlay = [];
    this.canvas.dataset.overlay = "0";
    this.canvas.dataset.mode = "none";
    this.requestDraw();
  }

  // Show a Deep Zoom image: `dzi` from parseDzi, `loadTile(level, col, row)` resolves to an ImageBitmap.
  showImage(dzi, loadTile) {
    this.clear();
    const levels = [];
    for (let w = dzi.width, h = dzi.height; ; w = Math.ceil(w / 2), h = Math.ceil(h / 2)) {
      levels.unshift({ w, h, cols: Math.ceil(w / dzi.tileSize), rows: Math.ceil(h / dzi.tileSize) });
      if (w === 1 && h === 1) break;
    }
    this.image = { ...dzi, maxLevel: levels.length - 1, levels };
    // the finest level in one tile: drawn under the others while they load
    this.image.baseLevel = levels.reduce((best, l, i) => (l.cols === 1 && l.rows === 1 ? i : best), 0);
    this.loadTile = loadTile;
    this.bounds = { x: 0, y: 0, w: dzi.width, h: dzi.height };
    this.canvas.dataset.mode = "image";
    this.fit();
  }

  // Show the tiles the model reads as squares: `coords` [[x, y], ...] level-0 corners, `size` level-0 side.
  showGrid(coords, size) {
    this.clear();
    this.grid = { coords, size };
    const xs = coords.map((c) => c[0]), ys = coords.map((c) => c[1]);
    const x = Math.min(...xs), y = Math.min(...ys);
    this.bounds = { x, y, w: Math.max(...xs) + size - x, h: Math.max(...ys) + size - y };
    this.canvas.dataset.mode = "grid";
    this.fit();
  }

  setOverlay(boxes) {
    this.overlay = boxes;
    this.canvas.dataset.overlay = String(boxes.length);
    this.requestDraw();
  }

  // -- view -------------------------------------------------------------------------------------------
  fitScale() {
    const b = this.bounds;
    return b ? Math.min(this.canvas.width / b.w, this.canvas.height / b.h) * 0.96 : 1;
  }

  fit() {
    const b = this.bounds;
    if (!b) return;
    const s = this.fitScale();
    const c = this.canvas;
    this.view = { x: b.x + b.w / 2 - c.width / (2 * s), y: b.y + b.h / 2 - c.height / (2 * s), scale: s };
    this.requestDraw();
  }

  // Zoom by `factor` keeping the level-0 point under canvas pixel (cx, cy) in place.
  zoomAt(cx, cy, factor) {
    const v = this.view;
    const s = Math.min(Math.max(v.scale * factor, this.fitScale() / 4), MAX_ZOOM);
    const x = v.x + cx / v.scale, y = v.y + cy / v.scale;
    this.view = { x: x - cx / s, y: y - cy / s, scale: s };
    this.requestDraw();
  }

  zoomCentre(factor) {
    this.zoomAt(this.canvas.width / 2, this.canvas.height / 2, factor);
  }

  panBy(dx, dy) {
    this.view = { ...this.view, x: this.view.x - dx / this.view.scale, y: this.view.y - dy / this.view.scale };
    this.requestDraw();
  }

  bindInput() {
    const c = this.canvas;
    const at = (e) => {  // event position in canvas pixels (the canvas may be shown smaller than it is)
      const r = c.getBoundingClientRect(), k = c.width / (c.clientWidth || c.width);
      return [(e.clientX - r.left - c.clientLeft) * k, (e.clientY - r.top - c.clientTop) * k];
    };
    c.addEventListener("wheel", (e) => {
      e.preventDefault();
      const [x, y] = at(e);
      this.zoomAt(x, y, Math.exp(-Math.max(-300, Math.min(300, e.deltaY)) * 0.004));
    }, { passive: false });
    c.addEventListener("dblclick", (e) => { const [x, y] = at(e); this.zoomAt(x, y, e.shiftKey ? 0.5 : 2); });
    let drag = null;
    c.addEventListener("pointerdown", (e) => { drag = at(e); c.setPointerCapture(e.pointerId); });
    c.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const p = at(e);
      this.panBy(p[0] - drag[0], p[1] - drag[1]);
      drag = p;
    });
    const stop = () => { drag = null; };
    c.addEventListener("pointerup", stop);
    c.addEventListener("pointercancel", stop);
  }

  // -- drawing ----------------------------------------------------------------------------------------
  requestDraw() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => { this.frame = 0; this.draw(); });
  }

  // The Deep Zoom level whose pixels are at most one canvas pixel (the sharpest needed).
  levelFor(scale) {
    const steps = Math.floor(Math.log2(1 / scale) + 1e-9);
    return Math.min(this.image.maxLevel, Math.max(0, this.image.maxLevel - Math.max(0, steps)));
  }

  // Tiles of `level` that intersect the canvas: [[col, row], ...]
  visibleTiles(level) {
    const { tileSize, maxLevel, levels } = this.image, v = this.view;
    const d = 2 ** (maxLevel - level), L = levels[level];
    const span = (from, px, n) => {
      const lo = Math.max(0, Math.floor(from / d / tileSize));
      const hi = Math.min(n - 1, Math.floor((from + px / v.scale) / d / tileSize));
      return [lo, hi];
    };
    const [c0, c1] = span(v.x, this.canvas.width, L.cols), [r0, r1] = span(v.y, this.canvas.height, L.rows);
    const out = [];
    for (let r = r0; r <= r1; r++) for (let col = c0; col <= c1; col++) out.push([col, r]);
    return out;
  }

  // Draws the cached tiles of `level` in view; returns the keys of those missing.
  drawLevel(level) {
    const { tileSize, overlap, maxLevel } = this.image, v = this.view, ctx = this.ctx;
    const d = 2 ** (maxLevel - level), missing = [];
    for (const [col, row] of this.visibleTiles(level)) {
      const key = `${level}/${col}/${row}`, bmp = this.cache.get(key);
      if (!bmp) { missing.push(key); continue; }
      this.cache.delete(key);  // most recently used last
      this.cache.set(key, bmp);
      const x0 = (col * tileSize - (col > 0 ? overlap : 0)) * d, y0 = (row * tileSize - (row > 0 ? overlap : 0)) * d;
      ctx.drawImage(bmp, (x0 - v.x) * v.scale, (y0 - v.y) * v.scale, bmp.width * d * v.scale, bmp.height * d * v.scale);
    }
    return missing;
  }

  draw() {
    const ctx = this.ctx, v = this.view, c = this.canvas;
    ctx.fillStyle = BACKDROP;
    ctx.fillRect(0, 0, c.width, c.height);
    let complete = true;
    if (this.image) {
      const b = this.bounds;
      ctx.fillStyle = "#ffffff";
      ctx.fillRect((b.x - v.x) * v.scale, (b.y - v.y) * v.scale, b.w * v.scale, b.h * v.scale);
      const level = this.levelFor(v.scale), base = Math.min(this.image.baseLevel, level);
      const missingBase = this.drawLevel(base);
      for (let l = Math.max(base + 1, level - 2); l < level; l++) this.drawLevel(l);
      const missing = level === base ? missingBase : this.drawLevel(level);
      this.wanted = [...missingBase, ...missing].filter((k) => !this.failed.has(k));
      complete = missing.length === 0;
      c.dataset.level = String(level);
      this.pump();
    } else if (this.grid) {
      const { coords, size } = this.grid, s = Math.max(size * v.scale, 1);
      ctx.fillStyle = GRID_COLOUR;
      for (const [x, y] of coords) ctx.fillRect((x - v.x) * v.scale, (y - v.y) * v.scale, s * 0.92, s * 0.92);
    }
    if (this.showOverlay) this.drawOverlay();
    c.dataset.view = [v.x, v.y, v.scale].map((n) => n.toFixed(4)).join(",");
    c.dataset.complete = complete ? "1" : "0";
  }

  drawOverlay() {
    const ctx = this.ctx, v = this.view;
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.font = "bold 12px system-ui, sans-serif";
    for (const box of this.overlay) {
      const x = (box.x - v.x) * v.scale, y = (box.y - v.y) * v.scale, s = Math.max(box.size * v.scale, 4);
      const lw = Math.min(3, s / 4);
      ctx.globalAlpha = 0.25;
      ctx.fillStyle = box.colour;
      ctx.fillRect(x, y, s, s);
      ctx.globalAlpha = 1;
      ctx.lineWidth = lw;
      ctx.strokeStyle = box.colour;
      ctx.strokeRect(x + lw / 2, y + lw / 2, s - lw, s - lw);  // inside the tile, so neighbours never overlap
      if (box.label && s >= 44) {
        ctx.lineWidth = 3;
        ctx.strokeStyle = "rgba(0,0,0,0.7)";
        ctx.strokeText(box.label, x + s / 2, y + s / 2);
        ctx.fillStyle = "#ffffff";
        ctx.fillText(box.label, x + s / 2, y + s / 2);
      }
    }
  }

  // -- tile loading -----------------------------------------------------------------------------------
  pump() {
    while (this.loading.size < MAX_LOADS && this.wanted.length) {
      const key = this.wanted.shift();
      if (this.loading.has(key) || this.cache.has(key)) continue;
      const [level, col, row] = key.split("/").map(Number), generation = this.generation;
      this.loading.add(key);
      this.loadTile(level, col, row).then((bmp) => {
        if (generation !== this.generation) { bmp.close(); return; }
        this.cache.set(key, bmp);
        while (this.cache.size > MAX_CACHED) {
          const [oldest, old] = this.cache.entries().next().value;
          this.cache.delete(oldest);
          old.close();
        }
      }).catch(() => {
        if (generation === this.generation) this.failed.add(key);  // not asked again for this slide
      }).finally(() => {
        if (generation !== this.generation) return;
        this.loading.delete(key);
        this.requestDraw();
      });
    }
  }
}
