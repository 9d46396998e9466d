// The dynagate dashboard: plain JavaScript, no build step, no dependencies.
//
// It holds no data of its own: every second it reads the admin API with the token the
// operator pasted (kept in sessionStorage, so it lives as long as the tab), and it
// changes things only through the same API. Elements are created once per key and then
// updated in place, so a refresh never flickers, moves focus or clears a form.
'use strict';

(function () {
  const TOKEN_KEY = 'dynagate.admin.token';
  const POLL_MS = 1000;
  const REVISIONS = 20;
  // While the registry answers 404 (not enabled), ask again only this often.
  const REGISTRY_RECHECK_MS = 15000;

  // ------------------------------------------------------------------ DOM helpers

  const $ = (testid, root = document) => root.querySelector(`[data-testid="${testid}"]`);

  /** Creates an element. `props`: class, testid, text, title, type, attrs, on. */
  function h(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    if (props.class) node.className = props.class;
    if (props.testid) node.dataset.testid = props.testid;
    if (props.text !== undefined) node.textContent = props.text;
    if (props.title) node.title = props.title;
    if (props.type) node.type = props.type;
    for (const [k, v] of Object.entries(props.attrs || {})) node.setAttribute(k, v);
    for (const [k, v] of Object.entries(props.on || {})) node.addEventListener(k, v);
    for (const c of children) if (c != null) node.append(c);
    return node;
  }

  function setText(node, text) {
    text = text == null ? '' : String(text);
    if (node.textContent !== text) node.textContent = text;
  }

  function setAttr(node, name, value) {
    if (value == null || value === false) {
      if (node.hasAttribute(name)) node.removeAttribute(name);
    } else if (node.getAttribute(name) !== String(value)) {
      node.setAttribute(name, value);
    }
  }

  function setTitle(node, title) {
    setAttr(node, 'title', title || null);
  }

  function show(node, visible) {
    if (node.hidden === !!visible) node.hidden = !visible;
  }

  function setClass(node, cls) {
    if (node.className !== cls) node.className = cls;
  }

  /**
   * Makes `parent`'s children match `items` in order: one element per key, created by
   * `create(item)` the first time, updated by `update(node, item)` every time.
   */
  function sync(parent, items, keyOf, create, update) {
    const existing = new Map();
    for (const child of Array.from(parent.children)) existing.set(child.dataset.key, child);
    const seen = new Set();
    let prev = null;
    for (const item of items) {
      const key = String(keyOf(item));
      seen.add(key);
      let node = existing.get(key);
      if (!node) {
        node = create(item);
        node.dataset.key = key;
      }
      update(node, item);
      const want = prev ? prev.nextSibling : parent.firstChild;
      if (node !== want) parent.insertBefore(node, want);
      prev = node;
    }
    for (const [key, node] of existing) if (!seen.has(key)) node.remove();
  }

  // ------------------------------------------------------------------ formatting

  function pad(n, width = 2) {
    return String(n).padStart(width, '0');
  }

  /** Local date and time, for tooltips: 2026-01-31 14:05:09 (UTC+01:00). */
  function absolute(ms) {
    const d = new Date(ms);
    const off = -d.getTimezoneOffset();
    const sign = off >= 0 ? '+' : '-';
    const tz = `UTC${sign}${pad(Math.floor(Math.abs(off) / 60))}:${pad(Math.abs(off) % 60)}`;
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())} (${tz})`;
  }

  function span(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${s % 60} s`;
    const hours = Math.floor(m / 60);
    if (hours < 24) return `${hours} h ${m % 60} min`;
    return `${Math.floor(hours / 24)} d ${hours % 24} h`;
  }

  /** "12 s ago", "3 min ago", "2 h ago", from Unix milliseconds (0: never). */
  function ago(ms) {
    if (!ms) return '–';
    const s = Math.floor((Date.now() - ms) / 1000);
    if (s < 2) return 'just now';
    if (s < 60) return `${s} s ago`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ago`;
    const hours = Math.floor(m / 60);
    if (hours < 48) return `${hours} h ago`;
    return `${Math.floor(hours / 24)} d ago`;
  }

  function rate(r) {
    if (r == null) return '–';
    if (r === 0) return '0';
    if (r < 10) return r.toFixed(1);
    if (r < 10000) return String(Math.round(r));
    return `${(r / 1000).toFixed(1)}k`;
  }

  function millis(ms) {
    if (ms < 1) return `${ms.toFixed(2)} ms`;
    if (ms < 10) return `${ms.toFixed(1)} ms`;
    if (ms < 1000) return `${Math.round(ms)} ms`;
    return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  }

  function count(n) {
    return n == null ? '–' : Number(n).toLocaleString('en-US');
  }

  // ------------------------------------------------------------------ API

  let token = sessionStorage.getItem(TOKEN_KEY) || '';
  // Bumped at every sign-in and sign-out: answers to an older session are dropped.
  let session = 0;

  class ApiError extends Error {
    constructor(status, statusText, message) {
      super(message);
      this.status = status;
      this.statusText = statusText;
    }

    /** The error as the API sent it, with its status. */
    describe() {
      if (!this.status) return this.message;
      return `HTTP ${this.status}${this.statusText ? ' ' + this.statusText : ''}: ${this.message}`;
    }
  }

  async function request(method, path, body, withToken = token) {
    const headers = { Authorization: `Bearer ${withToken}` };
    const init = { method, headers, cache: 'no-store', credentials: 'omit', redirect: 'error' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, '', `cannot reach the gateway (${e.message})`);
    }
    const text = await resp.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null;
    }
    if (!resp.ok) {
      const message = data && typeof data.error === 'string' ? data.error : text.trim();
      throw new ApiError(resp.status, resp.statusText, message || '(empty answer)');
    }
    return data;
  }

  const enc = encodeURIComponent;
  const serverPath = (up, addr) => `/v1/upstreams/${enc(up)}/servers/${enc(addr)}`;

  // ------------------------------------------------------------------ toasts and dialogs

  function toast(kind, text) {
    const box = $('toasts');
    const close = h('button', { class: 'toast-close', type: 'button', text: '×', title: 'Dismiss', attrs: { 'aria-label': 'Dismiss' } });
    const node = h('div', { class: `toast toast-${kind}`, testid: 'toast', attrs: { role: kind === 'error' ? 'alert' : 'status' } },
      h('span', { class: 'toast-text', text }), close);
    node.dataset.kind = kind;
    close.addEventListener('click', () => node.remove());
    box.append(node);
    while (box.children.length > 4) box.firstChild.remove();
    setTimeout(() => node.remove(), kind === 'error' ? 15000 : 6000);
  }

  function written(outcome) {
    if (!outcome) return 'done';
    return outcome.changed === false
      ? `no change (revision ${outcome.revision})`
      : `revision ${outcome.revision}: ${outcome.summary}`;
  }

  /** A modal question; resolves to true for OK. */
  function confirmDialog(title, message, okLabel, danger = true) {
    const dialog = $('confirm-dialog');
    setText($('confirm-title', dialog), title);
    setText($('confirm-message', dialog), message);
    const ok = $('confirm-ok', dialog);
    const cancel = $('confirm-cancel', dialog);
    setText(ok, okLabel);
    setClass(ok, danger ? 'btn btn-danger' : 'btn btn-primary');
    return new Promise((resolve) => {
      const done = (answer) => {
        ok.removeEventListener('click', onOk);
        cancel.removeEventListener('click', onCancel);
        dialog.removeEventListener('cancel', onCancel);
        if (dialog.open) dialog.close();
        resolve(answer);
      };
      const onOk = () => done(true);
      const onCancel = (ev) => {
        ev.preventDefault();
        done(false);
      };
      ok.addEventListener('click', onOk);
      cancel.addEventListener('click', onCancel);
      dialog.addEventListener('cancel', onCancel);
      dialog.showModal();
      cancel.focus();
    });
  }

  /** Runs an action: on 401 back to the login form, other errors as a toast. */
  async function act(buttons, fn) {
    for (const b of buttons) b.disabled = true;
    try {
      await fn();
    } catch (e) {
      if (!failedAuth(e)) toast('error', e instanceof ApiError ? e.describe() : String(e));
    } finally {
      for (const b of buttons) b.disabled = false;
      refreshNow();
    }
  }

  // ------------------------------------------------------------------ health, rates, p99

  /** A server is unhealthy when an active check, passive health or ejection says so. */
  function healthOf(s) {
    const reasons = [];
    if (s.registry && !['passing', 'warning'].includes(s.registry)) reasons.push(`registry: ${s.registry}`);
    if (s.health === 'unhealthy') reasons.push('active check failing');
    if (s.passive_unhealthy) reasons.push('passive: max_fails reached');
    if (s.ejected) reasons.push('ejected as an outlier');
    if (reasons.length) return { label: 'unhealthy', cls: 'bad', reasons };
    if (s.registry === 'warning') return { label: 'warning', cls: 'warn', reasons: ['registry: warning'] };
    if (s.health === 'healthy' || s.registry === 'passing') return { label: 'healthy', cls: 'good', reasons };
    return { label: s.health || 'unchecked', cls: 'neutral', reasons };
  }

  /**
   * The q-quantile of a latency histogram (non-cumulative counts, one per upper bound
   * plus one for +Inf), interpolated linearly inside its bucket as Prometheus does.
   * Returns null for no observations; `over` when it falls in the +Inf bucket.
   */
  function quantile(bounds, counts, q) {
    const total = counts.reduce((a, b) => a + b, 0);
    if (!total) return null;
    const rank = q * total;
    let cum = 0;
    for (let i = 0; i < counts.length; i++) {
      const c = counts[i];
      if (c > 0 && cum + c >= rank) {
        if (i >= bounds.length) return { ms: bounds[bounds.length - 1] || 0, over: true };
        const lower = i === 0 ? 0 : bounds[i - 1];
        return { ms: lower + (bounds[i] - lower) * ((rank - cum) / c), over: false };
      }
      cum += c;
    }
    return { ms: bounds[bounds.length - 1] || 0, over: true };
  }

  // Last counters seen per server, to turn them into rates between two polls.
  const samples = new Map();

  /** Request rate and p99 since the previous poll, and remembers this one. */
  function sampleServer(key, s, now) {
    const lat = s.latency && Array.isArray(s.latency.counts) ? s.latency : null;
    const prev = samples.get(key);
    samples.set(key, { t: now, requests: s.requests, counts: lat ? lat.counts.slice() : null, seen: now });
    const out = { rate: null, p99: null, p99Why: 'waiting for a second sample' };
    if (!prev || now <= prev.t || s.requests < prev.requests) return out;
    out.rate = (s.requests - prev.requests) / ((now - prev.t) / 1000);
    if (!lat) {
      out.p99Why = 'this gateway does not report latency';
      return out;
    }
    if (!prev.counts || prev.counts.length !== lat.counts.length) return out;
    const delta = lat.counts.map((c, i) => c - prev.counts[i]);
    if (delta.some((d) => d < 0)) return out;
    out.p99 = quantile(lat.bounds_ms || [], delta, 0.99);
    out.p99Why = out.p99 ? '' : 'no requests since the last refresh';
    return out;
  }

  // ------------------------------------------------------------------ upstreams

  const SERVER_COLUMNS = [
    ['Server', ''], ['State', ''], ['Health', ''], ['Last check', ''], ['Last change', ''],
    ['Failures', 'num'], ['In flight', 'num'], ['Req/s', 'num'], ['p99', 'num'], ['', 'actions'],
  ];

  function createUpstreamCard(up) {
    const name = up.name;
    const c = {};
    const card = h('article', { class: 'card upstream', testid: 'upstream-card' });
    card.dataset.upstream = name;
    card._c = c;

    c.summary = h('div', { class: 'chips', testid: 'upstream-summary' });
    c.settings = h('div', { class: 'settings', testid: 'upstream-settings' });
    card.append(h('header', { class: 'upstream-head' },
      h('div', { class: 'upstream-title' }, h('h3', { class: 'mono', testid: 'upstream-name', text: name }), c.summary),
      c.settings));

    c.tbody = h('tbody');
    const head = h('tr');
    for (const [label, cls] of SERVER_COLUMNS) head.append(h('th', { class: cls, text: label }));
    card.append(h('div', { class: 'table-wrap' },
      h('table', { class: 'grid servers', testid: 'servers-table' }, h('thead', {}, head), c.tbody)));
    c.noServers = h('p', { class: 'empty', text: 'No servers: this upstream answers 502 until one is added.', testid: 'servers-empty' });
    card.append(c.noServers);

    // Add a server: created once, never re-rendered, so typing is never disturbed.
    const address = h('input', { testid: 'add-server-address', attrs: { placeholder: 'host:port', 'aria-label': 'Server address', autocomplete: 'off', spellcheck: 'false' } });
    const weight = h('input', { type: 'number', testid: 'add-server-weight', attrs: { min: '1', max: '1000', value: '1', 'aria-label': 'Weight' } });
    const backup = h('input', { type: 'checkbox', testid: 'add-server-backup' });
    const submit = h('button', { type: 'submit', class: 'btn', testid: 'add-server-submit', text: 'Add server' });
    const error = h('p', { class: 'error', testid: 'add-server-error' });
    error.hidden = true;
    const form = h('form', { class: 'add-server', testid: 'add-server-form', attrs: { novalidate: '' } },
      h('span', { class: 'add-label', text: 'Add server' }), address,
      h('label', { class: 'inline' }, 'weight ', weight),
      h('label', { class: 'inline' }, backup, ' backup'),
      submit, error);
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const body = { address: address.value.trim() };
      if (weight.value !== '') body.weight = Number.isFinite(weight.valueAsNumber) ? weight.valueAsNumber : weight.value;
      if (backup.checked) body.backup = true;
      show(error, false);
      act([submit], async () => {
        try {
          const out = await request('POST', `/v1/upstreams/${enc(name)}/servers`, body);
          toast('ok', written(out));
          address.value = '';
          weight.value = '1';
          backup.checked = false;
        } catch (e) {
          if (e instanceof ApiError && e.status !== 401) {
            setText(error, e.describe());
            show(error, true);
            return;
          }
          throw e;
        }
      });
    });
    card.append(form);
    c.form = form;
    // Registry-fed upstreams: membership comes from the registry, not from this page.
    c.fedNote = h('p', { class: 'empty', testid: 'registry-fed-note', text: 'Servers come from the service registry: register or deregister instances to change them; drain overrides stay.' });
    card.append(c.fedNote);
    return card;
  }

  function upstreamSettings(up) {
    const parts = [up.balance || 'round_robin', `retries ${up.retries ?? '–'}`];
    if (up.max_fails === 0) parts.push('passive health off');
    else if (up.max_fails != null) parts.push(`max_fails ${up.max_fails} / ${up.fail_timeout}`);
    if (up.connect_timeout) parts.push(`connect ${up.connect_timeout}`);
    if (up.read_timeout) parts.push(`read ${up.read_timeout}`);
    if (up.keepalive != null) parts.push(`keepalive ${up.keepalive}`);
    if (up.health_check) parts.push('active checks on');
    return parts.join(' · ');
  }

  function chip(text, cls, testid) {
    return h('span', { class: `chip ${cls}`, text, testid });
  }

  function updateUpstreamCard(card, up, now) {
    const c = card._c;
    const live = Array.isArray(up.live) ? up.live : [];
    const rows = live.map((s) => {
      const key = `${up.name}\u0000${s.address}`;
      return { s, up: up.name, fed: !!up.registry_fed, key, health: healthOf(s), sample: sampleServer(key, s, now) };
    });
    show(c.form, !up.registry_fed);
    show(c.fedNote, !!up.registry_fed);
    sync(c.tbody, rows, (r) => r.s.address, createServerRow, updateServerRow);
    show(c.noServers, rows.length === 0);

    const unhealthy = rows.filter((r) => r.health.cls === 'bad').length;
    const healthy = rows.filter((r) => r.health.cls === 'good').length;
    const drain = rows.filter((r) => r.s.state === 'drain').length;
    const down = rows.filter((r) => r.s.state === 'down').length;
    const rates = rows.map((r) => r.sample.rate).filter((r) => r != null);
    const chips = [chip(`${rows.length} server${rows.length === 1 ? '' : 's'}`, 'neutral')];
    if (up.registry_fed) chips.push(chip('registry-fed', 'neutral', 'upstream-registry-fed'));
    if (healthy) chips.push(chip(`${healthy} healthy`, 'good'));
    if (unhealthy) chips.push(chip(`${unhealthy} unhealthy`, 'bad', 'upstream-unhealthy'));
    if (drain) chips.push(chip(`${drain} draining`, 'warn'));
    if (down) chips.push(chip(`${down} down`, 'neutral'));
    chips.push(chip(`${rate(rates.length ? rates.reduce((a, b) => a + b, 0) : null)} req/s`, 'neutral', 'upstream-rate'));
    const signature = chips.map((x) => x.className + x.textContent).join('|');
    if (c.summary.dataset.sig !== signature) {
      c.summary.replaceChildren(...chips);
      c.summary.dataset.sig = signature;
    }
    setText(c.settings, upstreamSettings(up));
  }

  function createServerRow(row) {
    const tr = h('tr', { testid: 'server-row' });
    const c = {};
    tr._c = c;
    c.address = h('span', { class: 'mono addr', testid: 'server-address' });
    c.sub = h('div', { class: 'sub' });
    c.state = h('span', { testid: 'server-state' });
    c.health = h('span', { testid: 'server-health' });
    c.healthWhy = h('div', { class: 'sub' });
    c.check = h('span', { testid: 'server-last-check' });
    c.checkMsg = h('div', { class: 'sub clip' });
    c.change = h('span', { testid: 'server-last-change' });
    c.failures = h('td', { class: 'num', testid: 'server-failures' });
    c.inFlight = h('td', { class: 'num', testid: 'server-in-flight' });
    c.rate = h('td', { class: 'num', testid: 'server-rate' });
    c.p99 = h('td', { class: 'num', testid: 'server-p99' });
    c.drain = h('button', { type: 'button', class: 'btn btn-small', testid: 'server-drain', text: 'Drain', title: 'No new requests; in-flight ones finish' });
    c.undrain = h('button', { type: 'button', class: 'btn btn-small', testid: 'server-undrain', text: 'Undrain', title: 'Take new requests again' });
    c.remove = h('button', { type: 'button', class: 'btn btn-small btn-danger-quiet', testid: 'server-remove', text: 'Remove' });
    tr.append(
      h('td', {}, c.address, c.sub),
      h('td', {}, c.state),
      h('td', {}, c.health, c.healthWhy),
      h('td', {}, c.check, c.checkMsg),
      h('td', {}, c.change),
      c.failures, c.inFlight, c.rate, c.p99,
      h('td', { class: 'actions' }, c.drain, c.undrain, c.remove),
    );
    const buttons = [c.drain, c.undrain, c.remove];
    const patch = (state) => act(buttons, async () => {
      const { up, s } = tr._row;
      toast('ok', written(await request('PATCH', serverPath(up, s.address), { state })));
    });
    c.drain.addEventListener('click', () => patch('drain'));
    c.undrain.addEventListener('click', () => patch('up'));
    c.remove.addEventListener('click', () => {
      const { up, s } = tr._row;
      removeServer(up, s.address, buttons);
    });
    return tr;
  }

  function updateServerRow(tr, row) {
    const { s, health, sample } = row;
    const c = tr._c;
    tr._row = row;
    show(c.remove, !row.fed);
    tr.dataset.upstream = row.up;
    tr.dataset.address = s.address;
    tr.dataset.state = s.state;
    tr.dataset.health = health.label;
    setClass(tr, health.cls === 'bad' ? 'row-bad' : s.state !== 'up' ? 'row-muted' : '');

    setText(c.address, s.address);
    const sub = [`weight ${s.weight}`];
    if (typeof s.effective_weight === 'number' && Math.abs(s.effective_weight - s.weight) >= 0.005) {
      sub.push(`effective ${s.effective_weight.toFixed(2)}`);
    }
    if (s.backup) sub.push('backup');
    if (s.zone) sub.push(`zone ${s.zone}`);
    setText(c.sub, sub.join(' · '));
    setTitle(c.address, s.available === false ? 'the balancer gives it no new requests now' : null);

    setText(c.state, s.state);
    setClass(c.state, `badge state-${s.state}`);

    setText(c.health, health.label);
    setClass(c.health, `badge ${health.cls}`);
    setText(c.healthWhy, health.reasons.join(', '));
    const ejections = s.ejections ? ` · ${s.ejections} ejection${s.ejections === 1 ? '' : 's'}` : '';
    setTitle(c.health, health.reasons.length ? health.reasons.join('\n') : null);

    const lc = s.last_check;
    if (lc && lc.time_ms) {
      setText(c.check, `${lc.ok ? 'ok' : 'failed'} · ${ago(lc.time_ms)}`);
      setClass(c.check, lc.ok ? 'ok-text' : 'bad-text');
      setTitle(c.check, absolute(lc.time_ms));
      setText(c.checkMsg, lc.message || '');
      setTitle(c.checkMsg, lc.message || null);
    } else {
      setText(c.check, '–');
      setClass(c.check, 'muted');
      setTitle(c.check, 'no active check has run');
      setText(c.checkMsg, '');
    }

    setText(c.change, ago(s.last_state_change_ms));
    setTitle(c.change, s.last_state_change_ms ? absolute(s.last_state_change_ms) : null);

    setText(c.failures, `${count(s.failures)}${ejections}`);
    setTitle(c.failures, 'failed attempts since the server was added (or the gateway started)');
    setText(c.inFlight, count(s.in_flight));

    setText(c.rate, rate(sample.rate));
    const resp = s.responses
      ? '\n' + ['1xx', '2xx', '3xx', '4xx', '5xx'].map((k) => `${k}: ${count(s.responses[k] || 0)}`).join('  ')
      : '';
    setTitle(c.rate, `${count(s.requests)} requests in all${resp}`);

    if (sample.p99) {
      setText(c.p99, sample.p99.over ? `> ${millis(sample.p99.ms)}` : millis(sample.p99.ms));
      setTitle(c.p99, 'p99 over the last refresh interval');
    } else {
      setText(c.p99, '–');
      setTitle(c.p99, sample.p99Why);
    }

    show(c.drain, s.state === 'up');
    show(c.undrain, s.state !== 'up');
    setText(c.undrain, s.state === 'down' ? 'Bring up' : 'Undrain');
  }

  async function removeServer(up, address, buttons) {
    const ok = await confirmDialog('Remove server', `Remove ${address} from ${up}? Requests in flight to it are cut. Drain it first to let them finish.`, 'Remove');
    if (!ok) return;
    await act(buttons, async () => {
      try {
        toast('ok', written(await request('DELETE', serverPath(up, address))));
      } catch (e) {
        if (!(e instanceof ApiError) || e.status !== 409) throw e;
        const force = await confirmDialog('The gateway refused', `${e.describe()}\n\nRemove it anyway (force)?`, 'Force remove');
        if (force) toast('ok', written(await request('DELETE', `${serverPath(up, address)}?force=true`)));
      }
    });
  }

  function renderUpstreams(list, now) {
    const box = $('upstreams');
    sync(box, list, (u) => u.name, createUpstreamCard, (card, up) => updateUpstreamCard(card, up, now));
    show($('upstreams-empty'), list.length === 0);
    const servers = list.reduce((n, u) => n + (u.live ? u.live.length : 0), 0);
    setText($('upstreams-count'), `${list.length} upstream${list.length === 1 ? '' : 's'}, ${servers} server${servers === 1 ? '' : 's'}`);
    // Forget servers that are gone, so one re-added starts with fresh rates.
    for (const [key, sample] of samples) if (sample.seen !== now) samples.delete(key);
  }

  // ------------------------------------------------------------------ routes

  function renderRoutes(list) {
    sync($('routes-table').tBodies[0], list, (r) => r.id, (r) => {
      const tr = h('tr', { testid: 'route-row' });
      tr.dataset.route = r.id;
      for (let i = 0; i < 6; i++) tr.append(h('td'));
      tr.cells[0].className = 'mono';
      tr.cells[2].className = 'mono';
      tr.cells[4].className = 'mono';
      return tr;
    }, (tr, r) => {
      setText(tr.cells[0], r.id);
      setText(tr.cells[1], r.hosts && r.hosts.length ? r.hosts.join(', ') : 'any');
      setText(tr.cells[2], r.path_prefix);
      setText(tr.cells[3], r.methods && r.methods.length ? r.methods.join(', ') : 'any');
      setText(tr.cells[4], r.upstream);
      setText(tr.cells[5], r.upstream_host || '–');
    });
    show($('routes-empty'), list.length === 0);
    setText($('routes-count'), `${list.length} route${list.length === 1 ? '' : 's'}`);
  }

  // ------------------------------------------------------------------ revisions

  let currentRevision = null;

  function renderRevisions(list) {
    const latest = currentRevision != null ? currentRevision : list.length ? list[0].number : 0;
    sync($('revisions-table').tBodies[0], list, (r) => r.number, (r) => {
      const tr = h('tr', { testid: 'revision-row' });
      tr.dataset.revision = r.number;
      const when = h('span');
      const button = h('button', { type: 'button', class: 'btn btn-small', testid: 'revision-rollback', text: 'Roll back to here' });
      const current = h('span', { class: 'badge good', text: 'current', testid: 'revision-current' });
      tr._c = { when, button, current };
      tr.append(h('td', { class: 'num', text: String(r.number) }), h('td', {}, when), h('td'), h('td', { class: 'actions' }, current, button));
      button.addEventListener('click', async () => {
        const n = r.number;
        const ok = await confirmDialog('Roll back', `Restore routes and upstreams exactly as they were after revision ${n}? This is recorded as a new revision, so it can be rolled back in turn.`, `Roll back to ${n}`);
        if (ok) await act([button], async () => toast('ok', written(await request('POST', `/v1/revisions/${n}/rollback`))));
      });
      return tr;
    }, (tr, r) => {
      const c = tr._c;
      setText(c.when, ago(r.time_ms));
      setTitle(c.when, absolute(r.time_ms));
      setText(tr.cells[2], r.summary);
      show(c.current, r.number === latest);
      show(c.button, r.number !== latest);
    });
    show($('revisions-empty'), list.length === 0);
  }

  // ------------------------------------------------------------------ registry

  function pick(obj, ...keys) {
    if (!obj || typeof obj !== 'object') return undefined;
    for (const k of keys) if (obj[k] != null) return obj[k];
    return undefined;
  }

  const HEALTH_ORDER = ['passing', 'warning', 'critical', 'maintenance'];

  function normalizeCheck(c) {
    return {
      id: String(pick(c, 'id', 'CheckID', 'ID') ?? pick(c, 'name', 'Name') ?? ''),
      name: String(pick(c, 'name', 'Name') ?? pick(c, 'id', 'CheckID') ?? ''),
      status: String(pick(c, 'status', 'Status') ?? 'unknown').toLowerCase(),
      output: String(pick(c, 'output', 'Output') ?? ''),
      type: String(pick(c, 'type', 'Type') ?? ''),
    };
  }

  function normalizeInstance(i) {
    const svc = pick(i, 'service', 'Service') || i;
    const checks = (pick(i, 'checks', 'Checks') || []).map(normalizeCheck);
    let address = String(pick(svc, 'address', 'Address', 'ServiceAddress') ?? '');
    const port = pick(svc, 'port', 'Port', 'ServicePort');
    if (port && !address.endsWith(`:${port}`)) address = address.includes(':') ? `[${address}]:${port}` : `${address}:${port}`;
    let health = pick(i, 'health', 'Health', 'status', 'Status', 'AggregatedStatus');
    if (health == null) {
      health = checks.reduce((worst, c) => (HEALTH_ORDER.indexOf(c.status) > HEALTH_ORDER.indexOf(worst) ? c.status : worst), 'passing');
    }
    return { id: String(pick(svc, 'id', 'ID', 'ServiceID') ?? address), address, health: String(health).toLowerCase(), checks };
  }

  /**
   * Accepts `[{name, tags, instances: [{id, address, port, health, checks: [...]}]}]`,
   * an object keyed by service name, and Consul's capitalised field names.
   */
  function normalizeRegistry(data) {
    if (data && !Array.isArray(data) && typeof data === 'object') {
      const inner = pick(data, 'services', 'Services');
      if (inner) return normalizeRegistry(inner);
      data = Object.entries(data).map(([name, v]) => (Array.isArray(v) ? { name, instances: v } : { name, ...v }));
    }
    if (!Array.isArray(data)) return [];
    return data.map((s) => ({
      name: String(pick(s, 'name', 'Name', 'ServiceName', 'service') ?? '?'),
      tags: pick(s, 'tags', 'Tags') || [],
      instances: (pick(s, 'instances', 'Instances', 'nodes', 'Nodes') || []).map(normalizeInstance),
    }));
  }

  function healthClass(status) {
    return { passing: 'good', healthy: 'good', warning: 'warn', critical: 'bad', unhealthy: 'bad', maintenance: 'neutral' }[status] || 'neutral';
  }

  function renderRegistry(services) {
    sync($('registry'), services, (s) => s.name, (s) => {
      const card = h('article', { class: 'card service', testid: 'registry-service' });
      card.dataset.service = s.name;
      const summary = h('span', { class: 'muted' });
      const tags = h('span', { class: 'tags muted' });
      const tbody = h('tbody');
      card._c = { summary, tags, tbody };
      card.append(
        h('header', { class: 'upstream-head' }, h('div', { class: 'upstream-title' }, h('h3', { class: 'mono', text: s.name }), tags, summary)),
        h('div', { class: 'table-wrap' }, h('table', { class: 'grid' },
          h('thead', {}, h('tr', {}, h('th', { text: 'Instance' }), h('th', { text: 'Address' }), h('th', { text: 'Health' }), h('th', { text: 'Checks' }))),
          tbody)));
      return card;
    }, (card, s) => {
      const c = card._c;
      const passing = s.instances.filter((i) => i.health === 'passing').length;
      setText(c.summary, `${s.instances.length} instance${s.instances.length === 1 ? '' : 's'}, ${passing} passing`);
      setText(c.tags, s.tags.length ? s.tags.join(' ') : '');
      sync(c.tbody, s.instances, (i) => i.id, () => {
        const tr = h('tr', { testid: 'registry-instance' });
        for (let i = 0; i < 4; i++) tr.append(h('td'));
        tr.cells[0].className = 'mono';
        tr.cells[1].className = 'mono';
        tr._health = h('span');
        tr.cells[2].append(tr._health);
        tr._checks = h('div', { class: 'checks' });
        tr.cells[3].append(tr._checks);
        return tr;
      }, (tr, i) => {
        tr.dataset.instance = i.id;
        setText(tr.cells[0], i.id);
        setText(tr.cells[1], i.address);
        setText(tr._health, i.health);
        setClass(tr._health, `badge ${healthClass(i.health)}`);
        sync(tr._checks, i.checks, (ch) => ch.id, () => h('span', { testid: 'registry-check' }), (node, ch) => {
          setText(node, `${ch.name}: ${ch.status}`);
          setClass(node, `chip ${healthClass(ch.status)}`);
          setTitle(node, [ch.type, ch.output].filter(Boolean).join(' — '));
        });
      });
    });
    show($('registry-empty'), services.length === 0);
    setText($('registry-count'), `${services.length} service${services.length === 1 ? '' : 's'}`);
  }

  // ------------------------------------------------------------------ polling

  let timer = null;
  let polling = false;
  let again = false;
  let lastOk = 0;
  let registryDisabledAt = 0;

  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(tick, ms);
  }

  /** Refreshes at once (after an action), or right after the poll under way. */
  function refreshNow() {
    if (token) schedule(0);
  }

  async function tick() {
    if (!token) return;
    if (polling) {
      again = true;
      return;
    }
    polling = true;
    const mine = session;
    try {
      await refresh(mine);
    } catch (e) {
      console.error(e);
    } finally {
      polling = false;
    }
    if (mine !== session || !token) return;
    if (again) {
      again = false;
      schedule(0);
    } else {
      schedule(POLL_MS);
    }
  }

  function sectionError(testid, e) {
    const node = $(testid);
    if (e) setText(node, e instanceof ApiError ? e.describe() : String(e));
    show(node, !!e);
  }

  async function refresh(mine) {
    const skipRegistry = registryDisabledAt && Date.now() - registryDisabledAt < REGISTRY_RECHECK_MS;
    const names = ['status', 'upstreams', 'routes', 'revisions', 'registry'];
    const results = await Promise.allSettled([
      request('GET', '/v1/status'),
      request('GET', '/v1/upstreams'),
      request('GET', '/v1/routes'),
      request('GET', `/v1/revisions?limit=${REVISIONS}`),
      skipRegistry ? Promise.resolve(null) : request('GET', '/v1/registry/services'),
    ]);
    if (mine !== session) return;
    const now = performance.now();
    const got = {};
    const errors = {};
    results.forEach((r, i) => {
      if (r.status === 'fulfilled') got[names[i]] = r.value;
      else errors[names[i]] = r.reason;
    });
    const denied = Object.values(errors).find((e) => e instanceof ApiError && e.status === 401);
    if (denied) {
      failedAuth(denied);
      return;
    }

    const unreachable = Object.values(errors).find((e) => e instanceof ApiError && e.status === 0);
    const live = $('live-indicator');
    const banner = $('banner');
    if (unreachable) {
      live.dataset.live = 'stale';
      setText($('live-indicator').querySelector('.live-text'), 'stale');
      const since = lastOk ? `; showing what it said ${ago(lastOk)}` : '';
      setText(banner, `The gateway did not answer: ${unreachable.message}${since}. Retrying every second.`);
      show(banner, true);
      return;
    }
    show(banner, false);
    lastOk = Date.now();
    live.dataset.live = 'ok';
    setText(live.querySelector('.live-text'), 'live');
    setTitle(live, `refreshed ${absolute(lastOk)}; every ${POLL_MS / 1000} s`);

    if (got.status) {
      currentRevision = got.status.revision;
      setText($('status-version'), got.status.version);
      setText($('status-revision'), got.status.revision);
      setText($('status-uptime'), span(got.status.uptime_s));
    }
    if (got.upstreams) renderUpstreams(got.upstreams, now);
    sectionError('upstreams-error', errors.upstreams);
    if (got.routes) renderRoutes(got.routes);
    sectionError('routes-error', errors.routes);
    if (got.revisions) renderRevisions(got.revisions);
    sectionError('revisions-error', errors.revisions);

    const regErr = errors.registry;
    if (regErr && regErr.status === 404) {
      registryDisabledAt = Date.now();
      renderRegistryDisabled(true);
    } else if (!skipRegistry) {
      registryDisabledAt = 0;
      if (got.registry != null) {
        renderRegistryDisabled(false);
        renderRegistry(normalizeRegistry(got.registry));
      }
      sectionError('registry-error', regErr);
    }
  }

  function renderRegistryDisabled(disabled) {
    show($('registry-disabled'), disabled);
    if (disabled) {
      $('registry').replaceChildren();
      show($('registry-empty'), false);
      setText($('registry-count'), '');
      sectionError('registry-error', null);
    }
  }

  // ------------------------------------------------------------------ sign in / out

  /** On a 401: forget the token and go back to the login form. True if it was one. */
  function failedAuth(e) {
    if (!(e instanceof ApiError) || e.status !== 401) return false;
    signOut(`Signed out: the gateway refused the token (${e.describe()}). Paste the current token to sign in again.`);
    return true;
  }

  function signOut(message) {
    session++;
    token = '';
    sessionStorage.removeItem(TOKEN_KEY);
    clearTimeout(timer);
    samples.clear();
    currentRevision = null;
    registryDisabledAt = 0;
    lastOk = 0;
    for (const id of ['upstreams', 'registry']) $(id).replaceChildren();
    for (const id of ['routes-table', 'revisions-table']) $(id).tBodies[0].replaceChildren();
    show(document.getElementById('dashboard'), false);
    show(document.getElementById('meta'), false);
    show(document.getElementById('jump'), false);
    show(document.getElementById('login'), true);
    const err = $('login-error');
    setText(err, message || '');
    show(err, !!message);
    const input = $('login-token');
    input.value = '';
    input.focus();
  }

  function signIn(newToken) {
    session++;
    token = newToken;
    sessionStorage.setItem(TOKEN_KEY, token);
    show(document.getElementById('login'), false);
    show(document.getElementById('dashboard'), true);
    show(document.getElementById('meta'), true);
    show(document.getElementById('jump'), true);
    const live = $('live-indicator');
    live.dataset.live = 'pending';
    setText(live.querySelector('.live-text'), 'connecting');
    schedule(0);
  }

  function start() {
    const form = $('login-form');
    const input = $('login-token');
    const submit = $('login-submit');
    const err = $('login-error');
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const candidate = input.value.trim();
      if (!candidate) {
        setText(err, 'Paste the admin token first.');
        show(err, true);
        return;
      }
      submit.disabled = true;
      setText(submit, 'Signing in…');
      try {
        await request('GET', '/v1/status', undefined, candidate);
        show(err, false);
        input.value = '';
        signIn(candidate);
      } catch (e) {
        const text = e instanceof ApiError && e.status === 401
          ? `The gateway refused this token (${e.describe()}).`
          : e instanceof ApiError ? e.describe() : String(e);
        setText(err, text);
        show(err, true);
        input.select();
      } finally {
        submit.disabled = false;
        setText(submit, 'Sign in');
      }
    });
    $('logout').addEventListener('click', () => signOut('Signed out.'));
    if (token) signIn(token);
    else signOut('');
  }

  start();
})();
