'use strict';
// Web UI for `sdctl serve`: talks only to the public A1111 / sd-webui-controlnet API.
(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  const state = {
    mode: 'txt2img',
    generating: false,
    results: [],        // [{src, infotext, seed, label}]
    selected: -1,
    lastSeed: null,
    initDataUrl: null,
    maskDirty: false,
    cnModules: ['none'],
    cnModels: ['None'],
    unitSeq: 0,
  };

  // ---------- errors ----------
  function showError(err) {
    const msg = err instanceof Error ? err.message : String(err);
    $('#error_text').textContent = msg;
    $('#error').hidden = false;
    console.error(err);
  }
  function clearError() { $('#error').hidden = true; $('#error_text').textContent = ''; }
  $('#error_close').addEventListener('click', clearError);

  function detailText(body) {
    if (!body || typeof body !== 'object') return null;
    const d = body.detail;
    if (typeof d === 'string') return d;
    if (Array.isArray(d)) {
      return d.map((e) => (e && e.msg ? `${(e.loc || []).join('.')}: ${e.msg}` : JSON.stringify(e))).join('; ');
    }
    if (d != null) return JSON.stringify(d);
    if (typeof body.error === 'string') return body.errors ? `${body.error}: ${body.errors}` : body.error;
    return null;
  }

  // JSON API call. Throws Error("METHOD path: STATUS message") on any failure.
  async function api(method, path, body) {
    const opts = { method, headers: { Accept: 'application/json' }, credentials: 'same-origin' };
    if (body !== undefined) {
      opts.headers['Content-Type'] = 'application/json';
      opts.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, opts);
    } catch (e) {
      throw new Error(`${method} ${path}: network error (${e.message}). Is the server running?`);
    }
    const text = await res.text();
    let data = null;
    let parsed = !text;
    try { if (text) { data = JSON.parse(text); parsed = true; } } catch (_) { data = null; }
    if (!res.ok) {
      const msg = detailText(data) || text.slice(0, 300) || res.statusText;
      throw new Error(`${method} ${path}: ${res.status} ${msg}`);
    }
    if (!parsed) throw new Error(`${method} ${path}: response is not JSON: ${text.slice(0, 200)}`);
    return data;
  }

  // ---------- helpers ----------
  const num = (id, dflt) => {
    const v = parseFloat($('#' + id).value);
    return Number.isFinite(v) ? v : dflt;
  };
  const int = (id, dflt) => {
    const v = parseInt($('#' + id).value, 10);
    return Number.isFinite(v) ? v : dflt;
  };
  const toDataUrl = (b64) => (b64.startsWith('data:') ? b64 : 'data:image/png;base64,' + b64);

  function readFile(file) {
    return new Promise((resolve, reject) => {
      const fr = new FileReader();
      fr.onload = () => resolve(fr.result);
      fr.onerror = () => reject(new Error(`cannot read ${file.name}`));
      fr.readAsDataURL(file);
    });
  }

  function fillSelect(sel, items, current) {
    sel.textContent = '';
    for (const it of items) {
      const o = document.createElement('option');
      o.value = it.value;
      o.textContent = it.label;
      sel.appendChild(o);
    }
    if (current != null && items.some((i) => i.value === current)) sel.value = current;
  }

  // Range slider next to each number field (A1111 look); the number input keeps the id.
  function attachSlider(field) {
    const numInput = field.querySelector('input[type=number]');
    const range = document.createElement('input');
    range.type = 'range';
    range.id = numInput.id + '_range';
    for (const a of ['min', 'max', 'step']) range.setAttribute(a, numInput.getAttribute(a));
    range.value = numInput.value;
    range.tabIndex = -1;
    const lbl = document.createElement('label');
    lbl.htmlFor = range.id;
    lbl.className = 'sr';
    lbl.textContent = field.querySelector('label').textContent + ' slider';
    range.addEventListener('input', () => { numInput.value = range.value; });
    numInput.addEventListener('input', () => { range.value = numInput.value; });
    numInput.addEventListener('change', () => { range.value = numInput.value; });
    field.appendChild(lbl);
    field.appendChild(range);
  }
  $$('.field.slider').forEach(attachSlider);
  const syncSlider = (id) => { const r = $('#' + id + '_range'); if (r) r.value = $('#' + id).value; };

  // ---------- tabs ----------
  function setMode(mode) {
    state.mode = mode;
    for (const [m, id] of [['txt2img', '#tab_txt2img'], ['img2img', '#tab_img2img']]) {
      const t = $(id);
      t.classList.toggle('active', m === mode);
      t.setAttribute('aria-selected', String(m === mode));
    }
    $('#img2img_panel').hidden = mode !== 'img2img';
    if (mode === 'img2img') sizeMaskCanvas();
  }
  $('#tab_txt2img').addEventListener('click', () => setMode('txt2img'));
  $('#tab_img2img').addEventListener('click', () => setMode('img2img'));

  // ---------- models ----------
  async function loadModels() {
    const sel = $('#model');
    sel.disabled = true;
    try {
      const [models, opts] = await Promise.all([api('GET', '/sdapi/v1/sd-models'), api('GET', '/sdapi/v1/options')]);
      const items = (models || []).map((m) => ({ value: m.title, label: m.title }));
      let cur = opts && opts.sd_model_checkpoint;
      if (cur && !items.some((i) => i.value === cur)) {
        const hit = items.find((i) => i.value.split(' [')[0] === cur);
        if (hit) cur = hit.value; else items.unshift({ value: cur, label: cur });
      }
      if (!items.length) items.push({ value: '', label: '(no models found)' });
      fillSelect(sel, items, cur);
      sel.dataset.current = sel.value;
    } catch (e) {
      showError(e);
    } finally {
      sel.disabled = false;
    }
  }
  $('#model').addEventListener('change', async () => {
    const sel = $('#model');
    const title = sel.value;
    sel.disabled = true;
    $('#model_status').textContent = 'loading…';
    try {
      await api('POST', '/sdapi/v1/options', { sd_model_checkpoint: title });
      sel.dataset.current = title;
      $('#model_status').textContent = '';
    } catch (e) {
      sel.value = sel.dataset.current || '';
      $('#model_status').textContent = '';
      showError(e);
    } finally {
      sel.disabled = false;
    }
  });
  $('#refresh_models').addEventListener('click', async () => {
    try { await api('POST', '/sdapi/v1/refresh-checkpoints'); } catch (e) { showError(e); }
    loadModels();
  });

  // ---------- samplers / schedulers ----------
  async function loadSamplers() {
    try {
      const list = await api('GET', '/sdapi/v1/samplers');
      fillSelect($('#sampler'), list.map((s) => ({ value: s.name, label: s.name })), 'Euler a');
    } catch (e) { showError(e); }
    try {
      const list = await api('GET', '/sdapi/v1/schedulers');
      fillSelect($('#scheduler'), list.map((s) => ({ value: s.name, label: s.label || s.name })), 'automatic');
    } catch (e) { showError(e); }
  }

  // ---------- LoRAs ----------
  let loras = [];
  function renderLoras() {
    const box = $('#lora_list');
    const f = $('#lora_filter').value.trim().toLowerCase();
    box.textContent = '';
    const shown = loras.filter((l) => !f || l.name.toLowerCase().includes(f) || (l.alias || '').toLowerCase().includes(f));
    for (const l of shown) {
      const b = document.createElement('button');
      b.type = 'button';
      b.className = 'lora';
      b.textContent = l.name;
      b.title = `Insert <lora:${l.name}:1>` + (l.path ? `\n${l.path}` : '');
      b.addEventListener('click', () => insertLora(l.name));
      box.appendChild(b);
    }
    if (!shown.length) {
      const p = document.createElement('p');
      p.className = 'muted small';
      p.textContent = loras.length ? 'No LoRA matches the filter.' : 'No LoRAs found (start the server with --lora-dir).';
      box.appendChild(p);
    }
    $('#lora_count').textContent = `(${loras.length})`;
  }
  function insertLora(name) {
    const ta = $('#prompt');
    const tag = `<lora:${name}:1>`;
    const v = ta.value;
    const start = ta.selectionStart ?? v.length;
    const end = ta.selectionEnd ?? v.length;
    const before = v.slice(0, start);
    const after = v.slice(end);
    const pre = before && !/[\s,]$/.test(before) ? ', ' : '';
    ta.value = before + pre + tag + after;
    const pos = (before + pre + tag).length;
    ta.focus();
    ta.setSelectionRange(pos, pos);
  }
  async function loadLoras() {
    try {
      loras = (await api('GET', '/sdapi/v1/loras')) || [];
    } catch (e) { showError(e); loras = []; }
    renderLoras();
  }
  $('#lora_filter').addEventListener('input', renderLoras);
  $('#refresh_loras').addEventListener('click', async () => {
    try { await api('POST', '/sdapi/v1/refresh-loras'); } catch (e) { showError(e); }
    loadLoras();
  });

  // ---------- ControlNet ----------
  async function loadControlNetLists() {
    try {
      const m = await api('GET', '/controlnet/module_list?alias_names=false');
      if (m && Array.isArray(m.module_list) && m.module_list.length) state.cnModules = m.module_list;
    } catch (e) { showError(e); }
    try {
      const m = await api('GET', '/controlnet/model_list');
      const list = (m && m.model_list) || [];
      state.cnModels = ['None', ...list.filter((x) => x !== 'None')];
    } catch (e) { showError(e); }
    for (const u of $$('.cn-unit')) fillUnitLists(u);
  }
  function fillUnitLists(unit) {
    const mod = $('.cn-module', unit);
    const model = $('.cn-model', unit);
    fillSelect(mod, state.cnModules.map((x) => ({ value: x, label: x })), mod.value || 'none');
    fillSelect(model, state.cnModels.map((x) => ({ value: x, label: x })), model.value || 'None');
  }
  function renumberUnits() {
    $$('.cn-unit').forEach((u, i) => { $('.cn-title', u).textContent = `ControlNet Unit ${i}`; });
    $('#cn_empty').hidden = $$('.cn-unit').length > 0;
  }
  function addUnit() {
    const frag = $('#cn_unit_tpl').content.cloneNode(true);
    const unit = frag.querySelector('.cn-unit');
    const n = state.unitSeq++;
    unit.dataset.unit = String(n);
    const pairs = [
      ['image', '.cn-image'], ['module', '.cn-module'], ['model', '.cn-model'], ['weight', '.cn-weight'],
      ['res', '.cn-processor-res'], ['start', '.cn-guidance-start'], ['end', '.cn-guidance-end'],
      ['mode', '.cn-control-mode'], ['resize', '.cn-resize-mode'], ['union', '.cn-union-type'],
    ];
    for (const [k, sel] of pairs) {
      const el = unit.querySelector(sel);
      el.id = `cn${n}_${k}`;
      unit.querySelector('.cn-lbl-' + k).htmlFor = el.id;
    }
    const en = unit.querySelector('.cn-enabled'); en.id = `cn${n}_enabled`;
    const pp = unit.querySelector('.cn-pixel-perfect'); pp.id = `cn${n}_pixel_perfect`;
    fillUnitLists(unit);
    $('.cn-image', unit).addEventListener('change', async (ev) => {
      const f = ev.target.files && ev.target.files[0];
      const thumb = $('.cn-thumb', unit);
      if (!f) { unit.dataset.image = ''; thumb.hidden = true; return; }
      try {
        const url = await readFile(f);
        unit.dataset.image = url;
        thumb.src = url;
        thumb.hidden = false;
        $('.cn-map', unit).hidden = true;
      } catch (e) { showError(e); }
    });
    $('.cn-remove', unit).addEventListener('click', () => { unit.remove(); renumberUnits(); });
    $('.cn-preview', unit).addEventListener('click', () => previewUnit(unit));
    $('#cn_units').appendChild(unit);
    renumberUnits();
    return unit;
  }
  async function previewUnit(unit) {
    const btn = $('.cn-preview', unit);
    const img = unit.dataset.image || (state.mode === 'img2img' ? state.initDataUrl : null);
    if (!img) { showError('ControlNet preview: upload a control image first.'); return; }
    btn.disabled = true;
    btn.textContent = 'Running…';
    try {
      const r = await api('POST', '/controlnet/detect', {
        controlnet_module: $('.cn-module', unit).value,
        controlnet_input_images: [img],
        controlnet_processor_res: parseInt($('.cn-processor-res', unit).value, 10) || 512,
        controlnet_threshold_a: -1,
        controlnet_threshold_b: -1,
      });
      const out = r && r.images && r.images[0];
      if (!out) throw new Error('POST /controlnet/detect: no image in response' + (r && r.info ? ` (${r.info})` : ''));
      const map = $('.cn-map', unit);
      map.src = toDataUrl(out);
      map.hidden = false;
    } catch (e) { showError(e); } finally {
      btn.disabled = false;
      btn.textContent = 'Preview';
    }
  }
  function unitPayload(unit, idx) {
    const f = (sel, d) => { const v = parseFloat($(sel, unit).value); return Number.isFinite(v) ? v : d; };
    const u = {
      enabled: $('.cn-enabled', unit).checked,
      module: $('.cn-module', unit).value,
      model: $('.cn-model', unit).value,
      weight: f('.cn-weight', 1),
      guidance_start: f('.cn-guidance-start', 0),
      guidance_end: f('.cn-guidance-end', 1),
      control_mode: $('.cn-control-mode', unit).value,
      resize_mode: $('.cn-resize-mode', unit).value,
      union_control_type: $('.cn-union-type', unit).value,
      processor_res: Math.round(f('.cn-processor-res', 512)),
      pixel_perfect: $('.cn-pixel-perfect', unit).checked,
    };
    if (unit.dataset.image) u.image = unit.dataset.image;
    else if (u.enabled && state.mode === 'txt2img') throw new Error(`ControlNet Unit ${idx}: enabled but no control image uploaded.`);
    return u;
  }
  $('#add_unit').addEventListener('click', () => addUnit());

  // ---------- img2img init image + mask painter ----------
  const canvas = $('#mask_canvas');
  const ctx = canvas.getContext('2d');
  function setInitImage(dataUrl) {
    state.initDataUrl = dataUrl;
    const img = $('#init_preview');
    if (!dataUrl) {
      $('#paint_wrap').hidden = true;
      img.removeAttribute('src');
      $('#init_image').value = '';
      return;
    }
    img.onload = () => {
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
      clearMask();
      $('#paint_wrap').hidden = false;
      // default the output size to the init image's size (multiple of 8)
      const r8 = (v) => Math.max(64, Math.round(v / 8) * 8);
      $('#width').value = r8(img.naturalWidth); syncSlider('width');
      $('#height').value = r8(img.naturalHeight); syncSlider('height');
      sizeMaskCanvas();
    };
    img.onerror = () => showError('Init image could not be decoded.');
    img.src = dataUrl;
  }
  function sizeMaskCanvas() { /* canvas is CSS-sized over the image; nothing to do but keep hook */ }
  function clearMask() {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    state.maskDirty = false;
  }
  let painting = false;
  let last = null;
  function canvasPoint(ev) {
    const r = canvas.getBoundingClientRect();
    return {
      x: (ev.clientX - r.left) * (canvas.width / r.width),
      y: (ev.clientY - r.top) * (canvas.height / r.height),
      scale: canvas.width / r.width,
    };
  }
  function stroke(p) {
    const size = parseInt($('#brush_size').value, 10) * p.scale;
    ctx.strokeStyle = '#fff';
    ctx.fillStyle = '#fff';
    ctx.lineCap = 'round';
    ctx.lineJoin = 'round';
    ctx.lineWidth = size;
    ctx.beginPath();
    if (last) { ctx.moveTo(last.x, last.y); ctx.lineTo(p.x, p.y); ctx.stroke(); }
    ctx.beginPath();
    ctx.arc(p.x, p.y, size / 2, 0, Math.PI * 2);
    ctx.fill();
    last = p;
    state.maskDirty = true;
  }
  canvas.addEventListener('pointerdown', (ev) => {
    if (!state.initDataUrl) return;
    painting = true;
    last = null;
    canvas.setPointerCapture(ev.pointerId);
    stroke(canvasPoint(ev));
    ev.preventDefault();
  });
  canvas.addEventListener('pointermove', (ev) => { if (painting) stroke(canvasPoint(ev)); });
  const endPaint = () => { painting = false; last = null; };
  canvas.addEventListener('pointerup', endPaint);
  canvas.addEventListener('pointercancel', endPaint);
  $('#brush_size').addEventListener('input', () => { $('#brush_size_out').textContent = $('#brush_size').value; });
  $('#clear_mask').addEventListener('click', clearMask);
  $('#clear_init').addEventListener('click', () => setInitImage(null));
  $('#init_image').addEventListener('change', async (ev) => {
    const f = ev.target.files && ev.target.files[0];
    if (!f) return;
    try { setInitImage(await readFile(f)); } catch (e) { showError(e); }
  });
  // Black/white PNG (white = inpaint), same size as the init image.
  function maskDataUrl() {
    const out = document.createElement('canvas');
    out.width = canvas.width;
    out.height = canvas.height;
    const o = out.getContext('2d');
    o.fillStyle = '#000';
    o.fillRect(0, 0, out.width, out.height);
    o.drawImage(canvas, 0, 0);
    const px = o.getImageData(0, 0, out.width, out.height);
    const d = px.data;
    for (let i = 0; i < d.length; i += 4) {
      const v = d[i] >= 128 ? 255 : 0;
      d[i] = d[i + 1] = d[i + 2] = v;
      d[i + 3] = 255;
    }
    o.putImageData(px, 0, 0);
    return out.toDataURL('image/png');
  }

  // ---------- progress ----------
  function fmtEta(s) {
    if (!Number.isFinite(s) || s <= 0) return '';
    if (s < 60) return `ETA ${s.toFixed(1)}s`;
    return `ETA ${Math.floor(s / 60)}m ${Math.round(s % 60)}s`;
  }
  function setProgress(frac, text) {
    const pct = Math.max(0, Math.min(100, Math.round(frac * 100)));
    $('#progress_fill').style.width = pct + '%';
    $('#progress').setAttribute('aria-valuenow', String(pct));
    $('#progress_text').textContent = text;
  }
  async function pollProgress(isDone) {
    let failures = 0;
    while (!isDone()) {
      await sleep(500);
      if (isDone()) break;
      try {
        const p = await api('GET', '/sdapi/v1/progress?skip_current_image=false');
        if (isDone()) break;
        failures = 0;
        const st = (p && p.state) || {};
        const parts = [];
        if (st.sampling_steps) parts.push(`Step ${st.sampling_step}/${st.sampling_steps}`);
        if (st.job_count > 1) parts.push(`Job ${(st.job_no || 0) + 1}/${st.job_count}`);
        parts.push(`${Math.round((p.progress || 0) * 100)}%`);
        const eta = fmtEta(p.eta_relative);
        if (eta) parts.push(eta);
        if (st.interrupted) parts.push('stopping…');
        setProgress(p.progress || 0, parts.join(' · '));
        if (p.current_image) {
          const lp = $('#live_preview');
          lp.src = toDataUrl(p.current_image);
          lp.hidden = false;
          $('#result_image').hidden = true;
          $('#viewer_empty').hidden = true;
        }
      } catch (e) {
        failures++;
        if (failures === 3) showError(e);
      }
    }
  }

  // ---------- generate ----------
  function buildPayload() {
    const payload = {
      prompt: $('#prompt').value,
      negative_prompt: $('#negative_prompt').value,
      sampler_name: $('#sampler').value,
      scheduler: $('#scheduler').value,
      steps: int('steps', 20),
      cfg_scale: num('cfg_scale', 7),
      width: int('width', 512),
      height: int('height', 512),
      seed: int('seed', -1),
      batch_size: int('batch_size', 1),
      n_iter: 1,
      override_settings: { CLIP_stop_at_last_layers: int('clip_skip', 1) },
      override_settings_restore_afterwards: true,
      send_images: true,
      save_images: false,
    };
    const units = $$('.cn-unit').map((u, i) => unitPayload(u, i));
    if (units.length) payload.alwayson_scripts = { controlnet: { args: units } };
    if (state.mode === 'img2img') {
      if (!state.initDataUrl) throw new Error('img2img: upload an init image first (or use "Send to img2img").');
      payload.init_images = [state.initDataUrl];
      payload.denoising_strength = num('denoising_strength', 0.75);
      payload.resize_mode = 0;
      if (state.maskDirty) {
        payload.mask = maskDataUrl();
        payload.mask_blur = int('mask_blur', 4);
        payload.inpainting_fill = int('inpainting_fill', 1);
        payload.inpaint_full_res = $('#inpaint_full_res').value === '1';
        payload.inpaint_full_res_padding = int('inpaint_full_res_padding', 32);
        payload.inpainting_mask_invert = int('inpainting_mask_invert', 0);
      }
    }
    return payload;
  }

  async function generate() {
    if (state.generating) return;
    clearError();
    let payload;
    try { payload = buildPayload(); } catch (e) { showError(e); return; }
    const endpoint = state.mode === 'img2img' ? '/sdapi/v1/img2img' : '/sdapi/v1/txt2img';
    state.generating = true;
    $('#generate').disabled = true;
    $('#generate').textContent = 'Generating…';
    $('#interrupt').disabled = false;
    $('#progress').hidden = false;
    setProgress(0, 'Waiting…');
    $('#time_taken').textContent = '';
    let done = false;
    const t0 = performance.now();
    const poller = pollProgress(() => done);
    try {
      const r = await api('POST', endpoint, payload);
      done = true;
      showResults(r);
      $('#time_taken').textContent = `Time taken: ${((performance.now() - t0) / 1000).toFixed(1)}s`;
    } catch (e) {
      done = true;
      showError(e);
    } finally {
      done = true;
      await poller;
      state.generating = false;
      $('#generate').disabled = false;
      $('#generate').textContent = 'Generate';
      $('#interrupt').disabled = true;
      $('#progress').hidden = true;
      $('#live_preview').hidden = true;
      if (state.selected >= 0) $('#result_image').hidden = false;
      else $('#viewer_empty').hidden = false;
    }
  }
  $('#generate').addEventListener('click', generate);
  document.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); generate(); }
    if (ev.key === 'Escape') $('#lightbox').hidden = true;
  });
  $('#interrupt').addEventListener('click', async () => {
    try {
      await api('POST', '/sdapi/v1/interrupt');
      $('#progress_text').textContent += ' · stopping…';
    } catch (e) { showError(e); }
  });

  // ---------- results ----------
  function showResults(r) {
    let info = {};
    if (r && typeof r.info === 'string') {
      try { info = JSON.parse(r.info); } catch (_) { info = {}; }
    } else if (r && r.info && typeof r.info === 'object') info = r.info;
    const images = (r && r.images) || [];
    if (!images.length) throw new Error('The server returned no images.');
    const infotexts = info.infotexts || [];
    const seeds = info.all_seeds || [];
    const nGen = infotexts.length || images.length;
    state.results = images.map((b64, i) => ({
      src: toDataUrl(b64),
      infotext: i < nGen ? (infotexts[i] || '') : 'ControlNet detected map',
      seed: i < nGen ? (seeds[i] ?? info.seed ?? null) : null,
      generated: i < nGen,
    }));
    if (info.seed != null) state.lastSeed = info.seed;
    renderGallery();
    selectResult(0);
  }
  function renderGallery() {
    const g = $('#gallery');
    g.textContent = '';
    state.results.forEach((res, i) => {
      const b = document.createElement('button');
      b.type = 'button';
      b.className = 'thumb' + (res.generated ? '' : ' detected');
      b.setAttribute('aria-label', res.generated ? `Result ${i + 1}` : `Detected map ${i + 1}`);
      const img = document.createElement('img');
      img.src = res.src;
      img.alt = res.generated ? `Result ${i + 1}` : 'ControlNet detected map';
      b.appendChild(img);
      b.addEventListener('click', () => selectResult(i));
      g.appendChild(b);
    });
  }
  function selectResult(i) {
    const res = state.results[i];
    if (!res) return;
    state.selected = i;
    $$('#gallery .thumb').forEach((t, j) => t.classList.toggle('selected', j === i));
    const big = $('#result_image');
    big.src = res.src;
    big.hidden = false;
    $('#live_preview').hidden = true;
    $('#viewer_empty').hidden = true;
    $('#infotext').textContent = res.infotext;
    $('#send_to_img2img').disabled = false;
    $('#use_image_seed').disabled = res.seed == null;
  }
  $('#result_image').addEventListener('click', () => {
    if (!$('#result_image').src) return;
    $('#lightbox_img').src = $('#result_image').src;
    $('#lightbox').hidden = false;
  });
  $('#lightbox').addEventListener('click', () => { $('#lightbox').hidden = true; });
  $('#send_to_img2img').addEventListener('click', () => {
    const res = state.results[state.selected];
    if (!res) return;
    setInitImage(res.src);
    setMode('img2img');
    $('#init_image').value = '';
    $('#img2img_panel').scrollIntoView({ behavior: 'smooth', block: 'start' });
  });
  $('#use_image_seed').addEventListener('click', () => {
    const res = state.results[state.selected];
    if (res && res.seed != null) $('#seed').value = res.seed;
  });
  $('#reuse_seed').addEventListener('click', () => {
    const res = state.results[state.selected];
    const s = res && res.seed != null ? res.seed : state.lastSeed;
    if (s != null) $('#seed').value = s;
  });
  $('#random_seed').addEventListener('click', () => { $('#seed').value = -1; });

  // ---------- start ----------
  renumberUnits();
  loadModels();
  loadSamplers();
  loadLoras();
  loadControlNetLists();
})();
