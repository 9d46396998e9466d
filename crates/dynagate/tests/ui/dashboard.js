// Drives Debian's headless Chromium through the dashboard, for tests/ui/main.rs.
//
//   node dashboard.js --admin http://127.0.0.1:PORT --token TOKEN --upstream shop \
//        --dead ADDR --drain ADDR --extra ADDR --solo UPSTREAM --out DIR \
//        [--chromium /usr/bin/chromium]
//
// Talks with the Rust test over stdio. Prints `STEP kill` when the page shows both
// servers and waits for `killed` (the test has killed the backend at --dead and sent
// requests through the proxy); prints `STEP drained` once the page has drained --drain
// and waits for `checked` (the test has read the state from the API); prints `DONE` at
// the end. Any failure exits non-zero with the reason on stderr, after a screenshot of
// the page as it was (failure.png).
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const readline = require('readline');
const { chromium } = require('playwright-core');

const STEP_TIMEOUT = 15000;

function args() {
  const out = { chromium: '/usr/bin/chromium' };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) throw new Error(`bad argument ${argv[i]}`);
    out[argv[i].slice(2)] = argv[i + 1];
  }
  for (const need of ['admin', 'token', 'upstream', 'dead', 'drain', 'extra', 'solo', 'out']) {
    if (!out[need]) throw new Error(`missing --${need}`);
  }
  return out;
}

const stdin = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function waitFor(line) {
  const next = await stdin.next();
  if (next.done || next.value.trim() !== line) {
    throw new Error(`expected ${JSON.stringify(line)} from the test, got ${JSON.stringify(next.value)}`);
  }
}

function log(text) {
  process.stderr.write(`[ui] ${text}\n`);
}

function check(cond, what) {
  if (!cond) throw new Error(what);
}

// What the registry section is shown in a second tab: the documented shape, and an
// instance in Consul's capitalised health-entry form.
const REGISTRY_SAMPLE = [
  {
    name: 'web',
    tags: ['v2'],
    instances: [
      {
        id: 'web-1', address: '192.0.2.10', port: 8080, health: 'passing',
        checks: [{ id: 'service:web-1', name: 'HTTP /health', type: 'http', status: 'passing', output: 'HTTP GET /health: 200 OK' }],
      },
      {
        id: 'web-2', address: '192.0.2.11', port: 8080,
        checks: [{ id: 'service:web-2', name: 'HTTP /health', type: 'http', status: 'critical', output: 'connection refused' }],
      },
    ],
  },
  {
    name: 'billing',
    instances: [
      { Service: { ID: 'billing-1', Address: '192.0.2.20', Port: 9000 }, Checks: [{ CheckID: 'ttl:billing-1', Name: 'TTL', Status: 'warning', Output: 'late heartbeat' }] },
    ],
  },
];

/** Script errors and Content-Security-Policy violations; failed loads are expected
 * (the wrong token's 401, the registry's 404, the 400 and 409 the test provokes). */
function watch(page, problems) {
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (msg) => {
    const text = msg.text();
    if (msg.type() === 'error' && !text.startsWith('Failed to load resource')) problems.push(`console: ${text}`);
  });
}

/** Signs in on a fresh tab. */
async function signIn(page, token) {
  await page.getByTestId('login-token').fill(token);
  await page.getByTestId('login-submit').click();
  await page.getByTestId('dashboard').waitFor();
}

async function main() {
  const opt = args();
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'dynagate-ui-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: opt.chromium,
    headless: true,
    viewport: { width: 1360, height: 900 },
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(STEP_TIMEOUT);

  const problems = [];
  watch(page, problems);

  const row = (address, upstream = opt.upstream) =>
    page.locator(`[data-testid="server-row"][data-upstream="${upstream}"][data-address="${address}"]`);
  const dialog = page.getByTestId('confirm-dialog');
  /** Waits for the confirmation dialog to be open with a message matching `re`. */
  const dialogSays = (re) => page.waitForFunction(([source, flags]) => {
    const d = document.querySelector('[data-testid="confirm-dialog"]');
    return d.open && new RegExp(source, flags).test(d.querySelector('[data-testid="confirm-message"]').textContent);
  }, [re.source, re.flags]);
  const lastToast = async () => {
    const toast = page.locator('[data-testid="toast"][data-kind="ok"]').last();
    await toast.waitFor();
    return toast.locator('.toast-text').textContent();
  };

  try {
    // 1. `/` redirects to the dashboard, which asks for the token.
    const resp = await page.goto(`${opt.admin}/`);
    check(resp && resp.ok(), `GET / answered ${resp && resp.status()}`);
    check(new URL(page.url()).pathname === '/ui/', `landed on ${page.url()}`);
    const csp = resp.headers()['content-security-policy'] || '';
    check(csp.includes("default-src 'none'"), `no strict CSP: ${csp}`);
    await page.getByTestId('login-form').waitFor();
    check(!(await page.getByTestId('dashboard').isVisible()), 'dashboard visible before login');
    log('login form shown');

    // 2. A wrong token is refused with the API's message.
    await page.getByTestId('login-token').fill(`${opt.token}-wrong`);
    await page.getByTestId('login-submit').click();
    const err = page.getByTestId('login-error');
    await err.waitFor();
    const errText = await err.textContent();
    check(/HTTP 401/.test(errText) && /token/.test(errText), `login error: ${errText}`);
    check(await page.getByTestId('login-form').isVisible(), 'left the login form with a wrong token');
    await page.screenshot({ path: path.join(opt.out, 'login.png') });
    log(`wrong token refused: ${errText}`);

    // 3. The right token shows the dashboard with both servers up.
    await signIn(page, opt.token);
    for (const address of [opt.dead, opt.drain]) {
      await row(address).waitFor();
      check((await row(address).getAttribute('data-state')) === 'up', `${address} not up`);
    }
    await page.waitForFunction(() => /\d/.test(document.querySelector('[data-testid="status-revision"]').textContent));
    await page.locator('[data-testid="route-row"]').first().waitFor();
    await page.locator('[data-testid="revision-row"]').first().waitFor();
    // The real registry: the service the test registered, its instance and its check.
    await page.getByTestId('registry-service').filter({ hasText: 'billing' }).waitFor();
    await page.getByTestId('registry-check').filter({ hasText: 'billing heartbeat' }).first().waitFor();
    check(await page.evaluate(() => !!sessionStorage.getItem('dynagate.admin.token')), 'token not kept in sessionStorage');
    log('signed in: both servers, routes, revisions shown');

    // 4. With the test's light traffic, both servers show a request rate and a p99
    //    (computed in the page from two polls of the counters and the histogram). The
    //    polls update the same elements in place: nothing is rebuilt, nothing flickers.
    const kept = await row(opt.drain).getByTestId('server-rate').elementHandle();
    await page.waitForFunction(({ upstream, addresses }) => addresses.every((a) => {
      const tr = document.querySelector(`[data-testid="server-row"][data-upstream="${upstream}"][data-address="${a}"]`);
      const rate = Number(tr.querySelector('[data-testid="server-rate"]').textContent);
      const p99 = tr.querySelector('[data-testid="server-p99"]').textContent;
      return rate > 0 && rate < 200 && /\d(\.\d+)? m?s$/.test(p99);
    }), { upstream: opt.upstream, addresses: [opt.dead, opt.drain] }, { timeout: STEP_TIMEOUT });
    for (const address of [opt.dead, opt.drain]) {
      const rate = await row(address).getByTestId('server-rate').textContent();
      const p99 = await row(address).getByTestId('server-p99').textContent();
      log(`${address}: ${rate} req/s, p99 ${p99}`);
    }
    check(await kept.evaluate((n) => n.isConnected), 'a server row was rebuilt by a poll');
    await page.screenshot({ path: path.join(opt.out, 'traffic.png'), fullPage: true });

    // 5. The test kills one backend and sends requests: the page turns it unhealthy.
    process.stdout.write('STEP kill\n');
    await waitFor('killed');
    await page.waitForSelector(
      `[data-testid="server-row"][data-address="${opt.dead}"][data-health="unhealthy"]`,
      { timeout: STEP_TIMEOUT },
    );
    const health = await row(opt.dead).getByTestId('server-health').textContent();
    check(health === 'unhealthy', `health cell reads ${health}`);
    await page.getByTestId('upstream-unhealthy').waitFor();
    check((await row(opt.drain).getAttribute('data-health')) !== 'unhealthy', 'the live server shows unhealthy');
    log(`${opt.dead} shown unhealthy`);

    // 6. Drain the other server from the page.
    await row(opt.drain).getByTestId('server-drain').click();
    await page.waitForSelector(
      `[data-testid="server-row"][data-address="${opt.drain}"][data-state="drain"]`,
      { timeout: STEP_TIMEOUT },
    );
    const state = await row(opt.drain).getByTestId('server-state').textContent();
    check(state === 'drain', `state cell reads ${state}`);
    await row(opt.drain).getByTestId('server-undrain').waitFor();
    const toastText = await lastToast();
    check(/revision \d+: update server/.test(toastText), `toast: ${toastText}`);
    log(`${opt.drain} drained from the page: ${toastText}`);

    // 7. Let one more poll land (rates from two samples), then the picture.
    await page.waitForTimeout(1300);
    await page.screenshot({ path: path.join(opt.out, 'dashboard.png'), fullPage: true });
    process.stdout.write('STEP drained\n');
    await waitFor('checked');

    // 8. Add a server: the API's refusal shows in the form as sent, then a good one.
    const form = page.locator(`[data-testid="upstream-card"][data-upstream="${opt.upstream}"] [data-testid="add-server-form"]`);
    await form.getByTestId('add-server-address').fill('no-port');
    await form.getByTestId('add-server-submit').click();
    const formErr = form.getByTestId('add-server-error');
    await formErr.waitFor();
    const formErrText = await formErr.textContent();
    check(/^HTTP 400 Bad Request: .*address/.test(formErrText), `add-server error: ${formErrText}`);
    await form.getByTestId('add-server-address').fill(opt.extra);
    await form.getByTestId('add-server-weight').fill('3');
    await form.getByTestId('add-server-submit').click();
    await row(opt.extra).waitFor();
    check(await formErr.isHidden(), 'the form error stayed after a success');
    check((await form.getByTestId('add-server-address').inputValue()) === '', 'the form was not cleared');
    check(/weight 3/.test(await row(opt.extra).textContent()), 'added server lacks weight 3');
    log(`added ${opt.extra} (after a refusal: ${formErrText})`);

    // 9. Undrain, then remove the added server through the confirmation dialog.
    await row(opt.drain).getByTestId('server-undrain').click();
    await page.waitForSelector(`[data-testid="server-row"][data-address="${opt.drain}"][data-state="up"]`);
    await row(opt.extra).getByTestId('server-remove').click();
    await dialogSays(/Remove/);
    await dialog.getByTestId('confirm-ok').click();
    await row(opt.extra).waitFor({ state: 'detached' });
    log(`undrained ${opt.drain}, removed ${opt.extra}`);

    // 10. The last server of an upstream: the 409 is shown as sent; Cancel keeps the
    //     server, Force remove takes it out.
    const solo = page.locator(`[data-testid="server-row"][data-upstream="${opt.solo}"]`);
    const soloAddress = await solo.getAttribute('data-address');
    for (const answer of ['confirm-cancel', 'confirm-ok']) {
      await solo.getByTestId('server-remove').click();
      await dialogSays(/Remove/);
      await dialog.getByTestId('confirm-ok').click();
      await dialogSays(/^HTTP 409 Conflict: .*force/s);
      await dialog.getByTestId(answer).click();
    }
    await solo.waitFor({ state: 'detached' });
    await page.locator(`[data-testid="upstream-card"][data-upstream="${opt.solo}"] [data-testid="servers-empty"]`).waitFor();
    const forced = await lastToast();
    const forcedRevision = Number((/^revision (\d+):/.exec(forced) || [])[1]);
    check(forcedRevision > 1, `toast after force: ${forced}`);
    log(`forced out the last server of ${opt.solo}: ${forced}`);

    // 11. Roll back to the revision before: the server is back.
    const target = page.locator(`[data-testid="revision-row"][data-revision="${forcedRevision - 1}"] [data-testid="revision-rollback"]`);
    await target.click();
    await dialogSays(new RegExp(`revision ${forcedRevision - 1}`));
    await dialog.getByTestId('confirm-ok').click();
    await row(soloAddress, opt.solo).waitFor();
    const rolled = await lastToast();
    check(new RegExp(`rollback to revision ${forcedRevision - 1}`).test(rolled), `toast after rollback: ${rolled}`);
    log(rolled);

    // 12. A second tab (its own sessionStorage: sign in again) whose registry answers are
    //     stubbed: services, instances and checks show.
    const tab = await context.newPage();
    watch(tab, problems);
    tab.setDefaultTimeout(STEP_TIMEOUT);
    await tab.route('**/v1/registry/services', (route) =>
      route.fulfill({ status: 200, contentType: 'application/json', body: JSON.stringify(REGISTRY_SAMPLE) }));
    await tab.goto(`${opt.admin}/ui/`);
    await signIn(tab, opt.token);
    await tab.locator('[data-testid="registry-service"][data-service="billing"]').waitFor();
    const instances = await tab.locator('[data-testid="registry-instance"]').allTextContents();
    check(instances.length === 3, `instances: ${JSON.stringify(instances)}`);
    const web2 = tab.locator('[data-testid="registry-instance"][data-instance="web-2"]');
    check(/192\.0\.2\.11:8080/.test(await web2.textContent()), 'web-2 address');
    check((await web2.locator('.badge').textContent()) === 'critical', 'web-2 health from its checks');
    const billing = tab.locator('[data-testid="registry-instance"][data-instance="billing-1"]');
    check(/192\.0\.2\.20:9000/.test(await billing.textContent()), 'billing-1 address');
    check((await billing.getByTestId('registry-check').textContent()) === 'TTL: warning', 'billing-1 check');
    check(await tab.getByTestId('registry-disabled').isHidden(), 'registry shown as disabled');
    await tab.locator('#registry-section').screenshot({ path: path.join(opt.out, 'registry.png') });

    // 13. A token the gateway no longer takes: back to the form, with the reason.
    await tab.evaluate(() => sessionStorage.setItem('dynagate.admin.token', 'stale-token'));
    await tab.reload();
    const signedOut = tab.getByTestId('login-error');
    await signedOut.waitFor();
    const signedOutText = await signedOut.textContent();
    check(/^Signed out: .*HTTP 401/.test(signedOutText), `after a 401: ${signedOutText}`);
    check(await tab.getByTestId('dashboard').isHidden(), 'dashboard still shown after a 401');
    check(await tab.evaluate(() => sessionStorage.getItem('dynagate.admin.token') === null), 'stale token kept');
    log('registry tab and 401 sign-out ok');

    check(problems.length === 0, `the page reported problems:\n${problems.join('\n')}`);
    process.stdout.write('DONE\n');
  } catch (e) {
    await page.screenshot({ path: path.join(opt.out, 'failure.png'), fullPage: true }).catch(() => {});
    if (problems.length) log(`page problems:\n${problems.join('\n')}`);
    throw e;
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (e) => {
    process.stderr.write(`[ui] FAILED: ${e && e.stack ? e.stack : e}\n`);
    process.exit(1);
  },
);
