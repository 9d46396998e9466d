// The npm `consul` client (version pinned in package.json / package-lock.json) against
// dynagate's registry.
//
// Usage: node node_consul_compat.js http://127.0.0.1:PORT
// Exits non-zero on the first failed expectation. Driven by `cargo test` (tests/compat.rs).
"use strict";

const assert = require("node:assert/strict");
const http = require("node:http");
const Consul = require("consul");

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function eventually(pred, what, timeoutMs = 8000) {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (await pred()) return;
    await sleep(100);
  }
  throw new Error(`timed out waiting for ${what}`);
}

function watchOnce(consul, method, options, trigger) {
  // Resolves with the first change after the initial answer.
  return new Promise((resolve, reject) => {
    const w = consul.watch({ method, options: { ...options, wait: "20s" } });
    let seen = 0;
    const timer = setTimeout(() => {
      w.end();
      reject(new Error("watch saw no change"));
    }, 15000);
    w.on("change", (data, res) => {
      seen += 1;
      if (seen === 1) {
        trigger().catch(reject);
        return;
      }
      clearTimeout(timer);
      w.end();
      resolve({ data, index: res.headers["x-consul-index"] });
    });
    w.on("error", (err) => {
      clearTimeout(timer);
      w.end();
      reject(err);
    });
  });
}

async function main() {
  const url = new URL(process.argv[2]);
  const consul = new Consul({ host: url.hostname, port: url.port });

  const backend = http.createServer((req, res) => {
    res.writeHead(200, { "Content-Length": 2 });
    res.end("ok");
  });
  await new Promise((r) => backend.listen(0, "127.0.0.1", r));
  const bport = backend.address().port;

  assert.equal(await consul.status.leader(), "127.0.0.1:8300");
  const self = await consul.agent.self();
  assert.equal(self.Config.Datacenter, "dc1");

  // Register with an HTTP check and with a TTL check (CamelCase bodies).
  await consul.agent.service.register({
    name: "web",
    id: "web1",
    address: "127.0.0.1",
    port: bport,
    tags: ["v1"],
    meta: { team: "edge" },
    check: { http: `http://127.0.0.1:${bport}/health`, interval: "1s", timeout: "1s" },
  });
  await consul.agent.service.register({
    name: "api",
    id: "api1",
    port: 9000,
    check: { ttl: "3s", notes: "heartbeat" },
  });
  const services = await consul.agent.service.list();
  assert.deepEqual(services.web1.Tags, ["v1"]);
  assert.deepEqual(services.web1.Meta, { team: "edge" });
  assert.equal(services.api1.Port, 9000);

  await eventually(async () => {
    const nodes = await consul.health.service({ service: "web", passing: true });
    return nodes.length === 1;
  }, "HTTP check to pass");

  // TTL heartbeat.
  let nodes = await consul.health.service({ service: "api", passing: true });
  assert.equal(nodes.length, 0, "TTL check starts critical");
  await consul.agent.check.pass({ id: "service:api1", note: "alive" });
  nodes = await consul.health.service({ service: "api", passing: true });
  assert.equal(nodes.length, 1, "passing after heartbeat");
  const checks = await consul.agent.check.list();
  assert.equal(checks["service:api1"].Output, "alive");

  // Watch (blocking queries) sees a catalog change.
  const seen = await watchOnce(
    consul,
    consul.catalog.service.nodes,
    { service: "api" },
    () => consul.agent.service.register({ name: "api", id: "api2", port: 9001 }),
  );
  assert.deepEqual(
    seen.data.map((n) => n.ServiceID).sort(),
    ["api1", "api2"],
  );
  // ... and a check status change.
  const seenHealth = await watchOnce(
    consul,
    consul.health.service,
    { service: "api" },
    () => consul.agent.check.fail({ id: "service:api1", note: "down" }),
  );
  const api1 = seenHealth.data.find((e) => e.Service.ID === "api1");
  assert.equal(api1.Checks[api1.Checks.length - 1].Status, "critical");

  // KV.
  assert.equal(await consul.kv.set("cfg/a", "1"), true);
  let v = await consul.kv.get("cfg/a");
  assert.equal(v.Value, "1");
  const mi = v.ModifyIndex;
  assert.equal(await consul.kv.set({ key: "cfg/a", value: "2", cas: mi }), true);
  // A failed CAS answers `false`; this client turns a falsy body into undefined.
  assert.ok(!(await consul.kv.set({ key: "cfg/a", value: "3", cas: mi })));
  assert.equal((await consul.kv.get("cfg/a")).Value, "2");
  assert.equal(await consul.kv.set({ key: "cfg/b/c", value: "x", flags: 9 }), true);
  v = await consul.kv.get("cfg/b/c");
  assert.equal(v.Flags, 9);
  const all = await consul.kv.get({ key: "cfg/", recurse: true });
  assert.deepEqual(all.map((e) => e.Key), ["cfg/a", "cfg/b/c"]);
  assert.equal(all[0].Value, "2");
  const keys = await consul.kv.keys({ key: "cfg/", separator: "/" });
  assert.deepEqual(keys, ["cfg/a", "cfg/b/"]);
  assert.equal(await consul.kv.get("missing"), undefined);
  const kvSeen = await watchOnce(
    consul,
    consul.kv.get,
    { key: "cfg/", recurse: true },
    () => consul.kv.del("cfg/a"),
  );
  assert.deepEqual(kvSeen.data.map((e) => e.Key), ["cfg/b/c"]);
  assert.equal(await consul.kv.del({ key: "cfg/", recurse: true }), true);
  assert.equal(await consul.kv.get({ key: "cfg/", recurse: true }), undefined);

  // A script check is refused with 400.
  await assert.rejects(
    consul.agent.service.register({
      name: "evil",
      check: { args: ["/bin/sh", "-c", "id"], interval: "10s" },
    }),
    (err) => {
      assert.equal(err.response.statusCode, 400);
      assert.match(String(err.response.body), /remote code execution/);
      return true;
    },
  );

  // Deregister.
  await consul.agent.service.deregister("web1");
  const after = await consul.agent.service.list();
  assert.equal(after.web1, undefined);
  await assert.rejects(consul.agent.service.deregister("web1"), (err) => {
    assert.equal(err.response.statusCode, 404);
    return true;
  });

  backend.close();
  console.log("node consul compat: OK");
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error("node consul compat FAILED:", err);
    process.exit(1);
  },
);
