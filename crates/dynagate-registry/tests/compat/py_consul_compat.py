"""py-consul (PyPI `py-consul`, pinned in requirements.txt) against dynagate's registry.

Usage: python3 py_consul_compat.py http://127.0.0.1:PORT
Exits non-zero on the first failed expectation. Driven by `cargo test` (tests/compat.rs).
"""

import http.server
import sys
import threading
import time
import urllib.parse

import consul
import consul.exceptions
from consul import Check


def fail(msg):
    print(f"py-consul compat FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def expect(cond, msg):
    if not cond:
        fail(msg)


def eventually(pred, what, timeout=8.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.1)
    fail(f"timed out waiting for {what}")


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    url = urllib.parse.urlparse(sys.argv[1])
    c = consul.Consul(host=url.hostname, port=url.port)
    # What py-consul's own requests session received (requests sends
    # `Accept-Encoding: gzip, deflate` and decodes gzip bodies transparently).
    codings = []
    c.http.session.hooks["response"].append(
        lambda r, *a, **k: codings.append((r.request.path_url, r.headers.get("Content-Encoding")))
    )

    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    bport = backend.server_address[1]

    # Ping.
    expect(c.status.leader() == "127.0.0.1:8300", "status.leader")
    expect(c.agent.self()["Config"]["Datacenter"] == "dc1", "agent.self")

    # Register with an HTTP check and with a TTL check (py-consul sends lowercase keys).
    ok = c.agent.service.register(
        "web",
        service_id="web1",
        address="127.0.0.1",
        port=bport,
        tags=["v1", "weight=2"],
        meta={"team": "edge"},
        check=Check.http(f"http://127.0.0.1:{bport}/health", "1s", timeout="1s", deregister="90s"),
    )
    expect(ok is True, "register web")
    expect(c.agent.service.register("api", service_id="api1", port=9000, check=Check.ttl("3s")) is True, "register api")
    services = c.agent.services()
    expect(services["web1"]["Tags"] == ["v1", "weight=2"], f"agent.services tags: {services}")
    expect(services["web1"]["Meta"] == {"team": "edge"}, "agent.services meta")
    expect(services["api1"]["Port"] == 9000, "agent.services port")

    # The HTTP check is run by the registry and passes.
    def web_passing():
        _, nodes = c.health.service("web", passing=True)
        return len(nodes) == 1

    eventually(web_passing, "HTTP check to pass")
    _, nodes = c.health.service("web")
    check_ids = [ch["CheckID"] for ch in nodes[0]["Checks"]]
    expect(check_ids == ["serfHealth", "service:web1"], f"checks {check_ids}")

    # TTL: critical until a heartbeat, passing after.
    _, nodes = c.health.service("api", passing=True)
    expect(nodes == [], "TTL check starts critical")
    c.agent.check.ttl_pass("service:api1", "alive")
    _, nodes = c.health.service("api", passing=True)
    expect(len(nodes) == 1, "passing after heartbeat")
    expect(c.agent.checks()["service:api1"]["Output"] == "alive", "heartbeat note is the output")

    # Watch: a blocking query returns when the catalog changes.
    index, _ = c.catalog.service("api")
    result = {}

    def watch():
        result["r"] = c.catalog.service("api", index=index, wait="20s")

    t = threading.Thread(target=watch)
    start = time.time()
    t.start()
    time.sleep(0.3)
    expect(t.is_alive(), "blocking query returned before any change")
    c.agent.service.register("api", service_id="api2", port=9001, check=Check.ttl("30s"))
    t.join(15)
    expect("r" in result, "blocking query did not return")
    new_index, nodes = result["r"]
    expect(int(new_index) > int(index), f"index moved {index} -> {new_index}")
    expect(sorted(n["ServiceID"] for n in nodes) == ["api1", "api2"], f"watch saw {nodes}")
    expect(time.time() - start < 10, "watch woke promptly")

    # Health watch sees a TTL status change.
    index, _ = c.health.service("api")
    result.clear()

    def watch_health():
        result["r"] = c.health.service("api", index=index, wait="20s")

    t = threading.Thread(target=watch_health)
    t.start()
    time.sleep(0.3)
    c.agent.check.ttl_fail("service:api1", "down")
    t.join(15)
    expect("r" in result, "health watch did not return")
    _, nodes = result["r"]
    statuses = {n["Service"]["ID"]: n["Checks"][-1]["Status"] for n in nodes}
    expect(statuses["api1"] == "critical", f"statuses {statuses}")

    # KV: put / get / cas / flags / recurse / keys / delete.
    expect(c.kv.put("cfg/a", "1") is True, "kv put")
    _, v = c.kv.get("cfg/a")
    expect(v["Value"] == b"1", f"kv get {v}")
    mi = v["ModifyIndex"]
    expect(c.kv.put("cfg/a", "2", cas=mi) is True, "cas with current index")
    expect(c.kv.put("cfg/a", "3", cas=mi) is False, "cas with stale index")
    expect(c.kv.put("cfg/a", "4", cas=0) is False, "cas=0 on existing key")
    expect(c.kv.put("cfg/new", "n", cas=0) is True, "cas=0 creates")
    expect(c.kv.put("cfg/b/c", "x", flags=5) is True, "put with flags")
    _, v = c.kv.get("cfg/b/c")
    expect(v["Flags"] == 5, "flags")
    _, vals = c.kv.get("cfg/", recurse=True)
    expect([x["Key"] for x in vals] == ["cfg/a", "cfg/b/c", "cfg/new"], f"recurse {vals}")
    expect(vals[0]["Value"] == b"2", "value after cas")
    _, keys = c.kv.get("cfg/", keys=True, separator="/")
    expect(keys == ["cfg/a", "cfg/b/", "cfg/new"], f"keys {keys}")
    index, missing = c.kv.get("nope")
    expect(missing is None and int(index) >= 1, "404 -> (index, None)")
    expect(c.kv.delete("cfg/new") is True, "delete")
    expect(c.kv.delete("cfg/", recurse=True) is True, "delete recurse")
    _, vals = c.kv.get("cfg/", recurse=True)
    expect(vals is None, "all gone")

    # KV watch.
    index, _ = c.kv.get("watched")
    result.clear()

    def watch_kv():
        result["r"] = c.kv.get("watched", index=index, wait="20s")

    t = threading.Thread(target=watch_kv)
    t.start()
    time.sleep(0.3)
    c.kv.put("watched", "now")
    t.join(15)
    expect(result.get("r", (0, None))[1]["Value"] == b"now", "kv watch")

    # gzip: large answers come coded (as from Consul's agent) and py-consul reads them.
    for i in range(12):
        c.agent.service.register(
            "big", service_id=f"big{i}", address=f"10.0.0.{i}", port=8000 + i, tags=["v1"],
            check=Check.ttl("1h"),
        )
    codings.clear()
    index, nodes = c.health.service("big")
    expect(sorted(n["Service"]["ID"] for n in nodes) == sorted(f"big{i}" for i in range(12)),
           f"health of 12 instances: {nodes}")
    expect(codings[-1][1] == "gzip", f"large answer not gzip-coded: {codings}")
    big_value = "".join(f"server 10.1.0.{i}:80 weight=1;\n" for i in range(100))
    expect(c.kv.put("cfg/big", big_value) is True, "kv put large value")
    codings.clear()
    _, v = c.kv.get("cfg/big")
    expect(v["Value"] == big_value.encode(), "large kv value read back through gzip")
    expect(codings[-1][1] == "gzip", f"kv answer not gzip-coded: {codings}")
    result.clear()

    def watch_big():
        result["r"] = c.health.service("big", index=index, wait="20s")

    t = threading.Thread(target=watch_big)
    t.start()
    time.sleep(0.3)
    codings.clear()
    c.agent.service.register("big", service_id="big12", port=8012, check=Check.ttl("1h"))
    t.join(15)
    expect("r" in result, "gzip watch did not return")
    new_index, nodes = result["r"]
    expect(int(new_index) > int(index) and len(nodes) == 13, f"gzip watch saw {len(nodes)} nodes")
    expect(("gzip" in [ce for path, ce in codings if "index=" in path]),
           f"blocking answer not gzip-coded: {codings}")
    _, small = c.kv.get("watched")
    expect(small["Value"] == b"now", "small answers stay readable")

    # A script check is refused.
    try:
        c.agent.service.register("evil", check=Check.script(["/bin/sh", "-c", "id"], "10s"))
        fail("script check was accepted")
    except consul.exceptions.BadRequest as e:
        expect("remote code execution" in str(e), f"refusal sentence: {e}")
    expect("evil" not in c.agent.services(), "refused service not registered")

    # Deregister.
    expect(c.agent.service.deregister("web1") is True, "deregister")
    expect("web1" not in c.agent.services(), "deregistered")
    try:
        c.agent.service.deregister("web1")
        # py-consul maps 404 on a write to True/False via the status code
    except consul.ConsulException:
        pass
    _, nodes = c.catalog.service("web")
    expect(nodes == [], "catalog empty after deregister")

    backend.shutdown()
    print("py-consul compat: OK")


if __name__ == "__main__":
    main()
