#!/usr/bin/env python3
"""Figure 8: the service registry (Consul HTTP API) — issue 4 §7.

1. Durable registrations per second over keep-alive HTTP/1.1 (`PUT /v1/agent/service/register`,
   every write committed with fsync before the answer): one client sequentially, then 8
   concurrent clients. The disk's own fsync rate (write + fsync of a small file in the data
   directory's file system) is measured for context.
2. 10,000 instances across 1,000 services, registered by 8 concurrent clients: load time,
   time until the gateway has every instance as an upstream server, resident memory.
3. 5,000 blocking watchers (`GET /v1/health/service/S?index=<current>&wait=300s`, one
   keep-alive connection each, a raw-socket epoll client in a second process): dynagate's
   memory while they wait, and the time from one write (a registration in the watched
   service) to every watcher of that service answered — measured with kernel receive
   timestamps (SO_TIMESTAMPNS) on the watchers' sockets, so the client's own speed does
   not count. Two layouts: spread (5 watchers on each of the 1,000 services; a write
   answers its service's 5, the other 4,995 must stay asleep) and all on one service
   (a write answers all 5,000). Watchers re-arm at once with the new index, as Consul
   clients do, and send `Accept-Encoding: gzip` as Go's net/http (consul/api,
   consul-template) and Python requests (py-consul) do by default, so answers come
   gzip-coded as from Consul; every coded answer is decoded and checked. The one-service
   layout runs once more with watchers that send no Accept-Encoding (identity bodies, as
   nginx-upsync-module gets them), reported as an info row. Repeated over several
   writes; percentiles over every answer.
4. Registration to routing: a new instance (nginx port answering its own port number) of a
   routed service is registered, then the proxy is polled (keep-alive GETs) until a
   response comes from it; ≥ 50 samples, on a nearly empty registry and with the 10,000
   instances loaded. The previous instance is deregistered between samples so the
   service has 2 instances (round robin reaches the new one on the first or second GET).

Layout: dynagate (1 worker) pinned to core 0 with its control runtime (registry, bridge,
admin); clients, watchers and nginx origins on core 1 — except in the watcher parts' layout
`unpinned` (BENCH_FIG8_LAYOUTS, below), where dynagate runs on both cores (its registry
thread and its fan-out helper threads wherever the kernel puts them) while the watcher
client, the probes and nginx stay on core 1. Each watcher part runs in a fresh dynagate
process (same data dir) per layout. BENCH_WATCHER_NICE=<n> starts the watcher client under
`nice -n <n>` (19: a stand-in for watchers on other hosts, which would not compete with
dynagate for a core); it is named in the rows. Instances of the loaded state use
`TTL 1h` checks registered passing, so no TTL expires during the run (a 30 s TTL without
heartbeats would turn all 10,000 critical in the middle of the watcher rounds); the
registrations of part 1 use the `TTL 30s` body of the brief. No nginx column: nginx has
no service registry.
"""
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from common import *  # noqa: E402,F401

SEQ_REGS = 100 if QUICK else 1000
CONC_REGS = 200 if QUICK else 2000
CONC_CLIENTS = 8
SERVICES = int(os.environ.get("BENCH_REG_SERVICES", "100" if QUICK else "1000"))
PER_SERVICE = 10
WATCHERS = int(os.environ.get("BENCH_WATCHERS", "500" if QUICK else "5000"))
WATCH_ROUNDS_ONE = 2 if QUICK else 5
WATCH_ROUNDS_SPREAD = 4 if QUICK else 20
ROUTE_SAMPLES = 10 if QUICK else 60
ROUTE_HOST = "routed.example"
ORIGIN_BASE = BASE + 130                      # ports of the "answers with its port" origin
# Parts to run (comma-separated; default all): rates (instance 1: routing on an empty
# registry, registration rates), routing (registration -> routed with the loaded state),
# spread / one (the two watcher layouts, gzip-accepting watchers), one-identity (the
# one-service layout with watchers that do not accept gzip), idle (RSS per idle
# connection). The 10,000-instance state is loaded whenever one of the last five runs.
# A partial run saves fig8-partial.json.
ALL_PARTS = {"rates", "routing", "spread", "one", "one-identity", "idle"}
PARTS = set(p for p in os.environ.get("BENCH_FIG8_PARTS", ",".join(sorted(ALL_PARTS))).split(",")
            if p)
# Layouts of the watcher parts (comma-separated, in this order; default both):
# `unpinned` — dynagate on both cores, the watcher client on core 1 (the target's row);
# `pinned` — dynagate on core 0 only, as the rest of the figure (info rows).
ALL_LAYOUTS = ("unpinned", "pinned")
LAYOUTS = [x for x in os.environ.get("BENCH_FIG8_LAYOUTS", ",".join(ALL_LAYOUTS)).split(",") if x]
WATCHER_NICE = int(os.environ.get("BENCH_WATCHER_NICE", "0"))
ALL_CPUS = f"0-{NCPU - 1}"
# With BENCH_FIG8_PERF=<dir>: `perf record -g` of dynagate during each watcher layout's
# answer rounds, written to <dir>/perf-<layout>.data (diagnosis only).
PERF_DIR = os.environ.get("BENCH_FIG8_PERF")
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)   # Linux value, not in Python's module


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))] if xs else None


def ms(x):
    return None if x is None else x * 1e3


class Registry:
    """Keep-alive Consul API client. put() returns (status, body, seconds)."""

    def __init__(self, port=DG_REGISTRY_PORT):
        self.port = port
        self.conn = None

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            t0 = time.perf_counter()
            try:
                self.conn.request(method, path, body=data,
                                  headers={"Content-Type": "application/json"} if data else {})
                r = self.conn.getresponse()
                out = r.read()
                return r.status, out, time.perf_counter() - t0, r.getheader("X-Consul-Index")
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError

    def ok(self, method, path, body=None):
        st, out, dt, _ = self.call(method, path, body)
        if st >= 300:
            raise RuntimeError(f"registry {method} {path} -> {st}: {out[:300]!r}")
        return dt

    def register(self, name, sid, address, port, ttl="1h"):
        return self.ok("PUT", "/v1/agent/service/register",
                       {"Name": name, "ID": sid, "Address": address, "Port": port,
                        "Check": {"TTL": ttl, "Status": "passing"}})

    def deregister(self, sid):
        return self.ok("PUT", f"/v1/agent/service/deregister/{sid}")


def fsync_rate(directory, n=200):
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            os.pwrite(fd, b"x" * 4096, (i % 16) * 4096)
            os.fsync(fd)
        return n / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)


def metric(dg, name):
    st, out, _ = dg.admin.call("GET", "/metrics")
    if st != 200:
        raise RuntimeError(f"/metrics -> {st}")
    for line in out.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def start_dynagate(name, ports):
    dg = Dynagate(1, PROXY_CPU, name=name, port=ports[0], admin_port=ports[1],
                  registry_port=ports[2])
    wait_port(dg.registry_port, 60)
    return dg


def registered_servers(dg):
    """Servers of registry-fed upstreams the gateway has (admin view)."""
    st, out, _ = dg.admin.call("GET", "/v1/upstreams")
    if st != 200:
        raise RuntimeError(f"GET /v1/upstreams -> {st}")
    return sum(len(u["servers"]) for u in json.loads(out) if u.get("registry_fed"))


# --------------------------------------------------------------------------- part 1

def registration_rates(dg):
    reg = Registry(dg.registry_port)
    lat = []
    c0 = cpu_seconds(dg.pids())
    t0 = time.perf_counter()
    for i in range(SEQ_REGS):
        lat.append(reg.register(f"rate-{i % 100}", f"seq-{i}", "127.0.0.1", 20000 + i % 10000,
                                ttl="30s"))
    seq_s = time.perf_counter() - t0
    seq_cpu = cpu_seconds(dg.pids()) - c0
    conc_lat = []
    errors = []

    def client(k):
        r = Registry(dg.registry_port)
        mine = []
        try:
            for i in range(k, CONC_REGS, CONC_CLIENTS):
                mine.append(r.register(f"rate-{i % 100}", f"conc-{i}", "127.0.0.1",
                                       30000 + i % 10000, ttl="30s"))
        except Exception as e:   # noqa: BLE001 — reported below
            errors.append(repr(e))
        conc_lat.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CONC_CLIENTS)]
    c0 = cpu_seconds(dg.pids())
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conc_s = time.perf_counter() - t0
    conc_cpu = cpu_seconds(dg.pids()) - c0
    if errors:
        raise RuntimeError(f"concurrent registrations failed: {errors[:3]}")
    return {"seq_rate": SEQ_REGS / seq_s, "seq_p50": pct(lat, 50), "seq_p99": pct(lat, 99),
            "conc_rate": CONC_REGS / conc_s, "conc_p50": pct(conc_lat, 50),
            "conc_p99": pct(conc_lat, 99), "seq_cpu_ms": seq_cpu * 1e3 / SEQ_REGS,
            "conc_cpu_ms": conc_cpu * 1e3 / CONC_REGS}


# --------------------------------------------------------------------------- part 2

def inst_addr(s, j):
    return f"10.{s // 250}.{s % 250}.{1 + j}", 8000 + j


def load_state(dg):
    """SERVICES × PER_SERVICE instances by 8 concurrent clients; returns timings."""
    total = SERVICES * PER_SERVICE
    lat = [[] for _ in range(CONC_CLIENTS)]
    errors = []

    def client(k):
        r = Registry(dg.registry_port)
        try:
            for n in range(k, total, CONC_CLIENTS):
                s, j = n % SERVICES, n // SERVICES
                a, p = inst_addr(s, j)
                lat[k].append((n, r.register(f"svc{s}", f"svc{s}-{j}", a, p)))
        except Exception as e:   # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CONC_CLIENTS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load_s = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"registrations failed: {errors[:3]}")
    # Until the gateway has the last instance of each client as an upstream server (the
    # bridge is asynchronous and applies the whole registry on each pass), then one full count.
    last = {}
    for k in range(CONC_CLIENTS):
        if lat[k]:
            n = lat[k][-1][0]
            s, j = n % SERVICES, n // SERVICES
            a, p = inst_addr(s, j)
            last[f"svc{s}"] = f"{a}:{p}"
    deadline = time.perf_counter() + 120
    todo = dict(last)
    while todo and time.perf_counter() < deadline:
        for name, address in list(todo.items()):
            code, out, _ = dg.admin.call("GET", f"/v1/upstreams/{name}")
            if code == 200 and any(x["address"] == address for x in json.loads(out)["servers"]):
                del todo[name]
        if todo:
            time.sleep(0.01)
    synced_s = time.perf_counter() - t0
    have = registered_servers(dg)
    allat = sorted(lat[k][i] for k in range(CONC_CLIENTS) for i in range(len(lat[k])))
    first = [x for n, x in allat[:1000]]
    last = [x for n, x in allat[-1000:]]
    return {"load_s": load_s, "synced_s": synced_s, "gateway_servers": have, "total": total,
            "first_p50": pct(first, 50), "last_p50": pct(last, 50), "last_p99": pct(last, 99)}


# --------------------------------------------------------------------------- part 4

def origin_conf(ports):
    d, head = common_nginx_head("reg-origin")
    listens = "\n".join(f"    listen 127.0.0.1:{p};" for p in ports)
    return head + f"""
http {{
  access_log off;
  default_type text/plain;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {{
{listens}
    location / {{ return 200 "$server_port"; }}
  }}
}}
"""


def common_nginx_head(name):
    # the same head as every nginx of the benchmark (its own prefix under WORK)
    import common
    return common._nginx_common(name, 1)


class Poller:
    """Keep-alive GETs through the proxy; returns the body (an origin port) as text."""

    def __init__(self, port, host):
        self.port, self.host = port, host
        self.conn = None

    def get(self):
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self.conn.request("GET", "/", headers={"Host": self.host})
                r = self.conn.getresponse()
                body = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return r.status, body.decode(errors="replace")
            except (ConnectionError, http.client.HTTPException, OSError):
                if self.conn:
                    self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError


def routing_latency(dg, ports, tag):
    """Registration → first proxied response from the new instance, ROUTE_SAMPLES times."""
    reg = Registry(dg.registry_port)
    svc = f"routed-{tag}"
    host = f"{tag}.{ROUTE_HOST}"
    reg.register(svc, f"{svc}-base", "127.0.0.1", ports[0])
    deadline = time.time() + 30
    while dg.admin.call("GET", f"/v1/upstreams/{svc}")[0] != 200:
        if time.time() > deadline:
            raise RuntimeError(f"service {svc} never became an upstream")
        time.sleep(0.01)
    dg.admin.ok("PUT", f"/v1/routes/{svc}", {"hosts": [host], "path_prefix": "/", "upstream": svc})
    poll = Poller(dg.port, host)
    deadline = time.time() + 30
    while poll.get() != (200, str(ports[0])):
        if time.time() > deadline:
            raise RuntimeError(f"route to {svc} never answered from its base instance")
        time.sleep(0.01)
    lat, acks, polls, non200 = [], [], [], 0
    c0 = cpu_seconds(dg.pids())
    t_start = time.perf_counter()
    for k in range(1, ROUTE_SAMPLES + 1):
        port = ports[k]
        want = str(port)
        t0 = time.perf_counter()
        acks.append(reg.register(svc, f"{svc}-{k}", "127.0.0.1", port))
        n = 0
        while True:
            st, body = poll.get()
            n += 1
            if st != 200:
                non200 += 1
            if body == want:
                break
            if time.perf_counter() - t0 > 10:
                raise RuntimeError(f"instance {want} not routed 10 s after registering")
        lat.append(time.perf_counter() - t0)
        polls.append(n)
        reg.deregister(f"{svc}-{k}")
        # until the deregistered instance has left the upstream
        deadline = time.time() + 10
        while True:
            st, out, _ = dg.admin.call("GET", f"/v1/upstreams/{svc}")
            if st == 200 and len(json.loads(out)["servers"]) == 1:
                break
            if time.time() > deadline:
                raise RuntimeError(f"{svc}-{k} did not leave the upstream")
            time.sleep(0.005)
        time.sleep(0.02)
    cpu = cpu_seconds(dg.pids()) - c0
    return {"lat": lat, "acks": acks, "polls": polls, "non200": non200,
            "cpu_ms_per_sample": cpu * 1e3 / ROUTE_SAMPLES,
            "wall_ms_per_sample": (time.perf_counter() - t_start) * 1e3 / ROUTE_SAMPLES}


# --------------------------------------------------------------------------- part 3

class Watchers:
    """The watcher client (this file with --watch-client), a separate process on LOAD_CPU."""

    def __init__(self, registry_port, services, wait="300s", idle=False, gzip=True):
        spec = os.path.join(WORK, f"watchers-{len(services)}.json")
        with open(spec, "w") as f:
            json.dump({"services": services, "wait": wait, "idle": idle, "gzip": gzip}, f)
        cmd = [sys.executable, os.path.abspath(__file__), "--watch-client", str(registry_port),
               spec]
        if WATCHER_NICE:
            cmd = ["nice", "-n", str(WATCHER_NICE)] + cmd
        self.p = subprocess.Popen(pinned(cmd, LOAD_CPU),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  preexec_fn=os.setpgrp)
        _procs_append(self.p)
        line = self.p.stdout.readline().split()
        if not line or line[0] != "READY":
            raise RuntimeError(f"watcher client did not start: {line}")
        self.open, self.failed = int(line[1]), int(line[2])

    def cmd(self, text):
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()

    def clear(self):
        self.cmd("CLEAR")
        line = self.p.stdout.readline()
        if not line.startswith("OK"):
            raise RuntimeError(f"watcher client: {line!r}")
        return json.loads(line[3:])

    def wait(self, svc, expected, timeout, grace=0.3):
        """Answers until `expected` of service svc came (then `grace` s more, to catch
        answers to watchers of other services), or timeout."""
        self.cmd(f"WAIT {svc} {expected} {timeout} {grace}")
        line = self.p.stdout.readline()
        if not line.startswith("ANSWERS "):
            raise RuntimeError(f"watcher client: {line[:200]!r}")
        return json.loads(line[8:])

    def quit(self):
        try:
            self.cmd("QUIT")
            self.p.wait(30)
        except Exception:   # noqa: BLE001
            stop(self.p)


def _procs_append(p):
    import common
    common._procs.append(p)


class StallProbe(threading.Thread):
    """Times a cheap registry read and a cheap admin read back to back (every 5 ms) while
    the watchers are being answered: shows whether the control plane stalls meanwhile."""

    def __init__(self, dg):
        super().__init__(daemon=True)
        self.reg, self.admin = Registry(dg.registry_port), Admin(dg.admin_port)
        self.stop_ev = threading.Event()
        self.reg_lat, self.admin_lat = [], []

    def run(self):
        while not self.stop_ev.is_set():
            t = time.perf_counter()
            self.reg.call("GET", "/v1/status/leader")
            self.reg_lat.append(time.perf_counter() - t)
            t = time.perf_counter()
            self.admin.call("GET", "/v1/routes")
            self.admin_lat.append(time.perf_counter() - t)
            time.sleep(0.005)

    def finish(self):
        self.stop_ev.set()
        self.join(120)
        return (max(self.reg_lat) * 1e3 if self.reg_lat else None,
                max(self.admin_lat) * 1e3 if self.admin_lat else None)


def idle_connection_cost(dg, n):
    """RSS per plain keep-alive registry connection (one answered request each), to tell the
    connection's share of a watcher's memory from the blocking query's."""
    r0 = rss_kib(dg.pids())
    w = Watchers(dg.registry_port, ["-"] * n, idle=True)
    time.sleep(1)
    r1 = rss_kib(dg.pids())
    w.quit()
    time.sleep(1)
    return (r1 - r0) / max(1, w.open), w.open


def wait_watchers(dg, n, timeout=60):
    deadline = time.time() + timeout
    w = None
    while time.time() < deadline:
        w = metric(dg, "dynagate_registry_watchers")
        if w is not None and w >= n:
            return w
        time.sleep(0.2)
    raise RuntimeError(f"only {w} watchers waiting, wanted {n}")


def watcher_rounds(dg, layout, rounds, gzip=True, cpus="pinned"):
    """layout 'spread': 5 per service over all services; 'one': all on svc0. gzip: the
    watchers send `Accept-Encoding: gzip` (as Go and Python Consul clients do). cpus: the
    name of dynagate's CPU layout (see LAYOUTS), for the logs and the results."""
    tag = (layout if gzip else f"{layout}-identity") + f"-{cpus}"
    if layout == "spread":
        services = [f"svc{i % SERVICES}" for i in range(WATCHERS)]
    else:
        services = ["svc0"] * WATCHERS
    reg = Registry(dg.registry_port)
    rss_before = rss_kib(dg.pids())
    fds_before = fd_count(dg.proc.pid)
    t0 = time.perf_counter()
    w = Watchers(dg.registry_port, services, gzip=gzip)
    if w.failed:
        raise RuntimeError(f"{w.failed} watcher connections failed")
    wait_watchers(dg, w.open)
    setup_s = time.perf_counter() - t0
    time.sleep(1)
    rss_waiting = rss_kib(dg.pids())
    try:
        dg_cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(dg.proc.pid)))
    except OSError:
        dg_cpus = "?"
    log(f"  {tag}: dynagate on cpus {dg_cpus}; {w.open} watchers waiting (set up in {setup_s:.1f}s); RSS "
        f"{rss_before / 1024:.1f} -> {rss_waiting / 1024:.1f} MiB; fds {fds_before} -> "
        f"{fd_count(dg.proc.pid)}")
    perf = None
    if PERF_DIR:
        perf = subprocess.Popen(["perf", "record", "-g", "-F", "999", "-k", "CLOCK_MONOTONIC",
                                 "-p", str(dg.proc.pid),
                                 "-o", os.path.join(PERF_DIR, f"perf-{tag}.data")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
    per_round = []
    all_lat, all_lat_ack = [], []
    spurious = missing = bad_coding = 0
    for k in range(rounds):
        wait_watchers(dg, w.open)
        time.sleep(0.3)
        stale = w.clear()
        if stale:
            log(f"  {tag} round {k}: {stale} answers before the write (timeouts?)")
        svc = "svc0" if layout == "one" else f"svc{(k * 7919 + 11) % SERVICES}"
        expected = services.count(svc)
        probe = StallProbe(dg)
        probe.start()
        time.sleep(0.05)
        c0 = cpu_seconds(dg.pids())
        t_write = time.time_ns()
        t_mono = time.monotonic()
        ack = reg.register(svc, f"{svc}-extra-{tag}-{k}", "10.255.0.1", 9000 + k)
        t_ack = time.time_ns()
        answers = w.wait(svc, expected, 60)
        cpu = cpu_seconds(dg.pids()) - c0
        probe_reg_ms, probe_admin_ms = probe.finish()
        mine = [a for a in answers if a["svc"] == svc and a["status"] == 200]
        coded = sum(1 for a in mine if a.get("gzip"))
        bad_coding += sum(1 for a in mine if a.get("gzip") != gzip or a.get("bad_body"))
        spurious += len([a for a in answers if a["svc"] != svc])
        missing += max(0, expected - len(mine))
        lat = [(a["kts"] - t_write) / 1e6 for a in mine]
        lat_ack = [(a["kts"] - t_ack) / 1e6 for a in mine]
        client_lag = [(a["uts"] - a["kts"]) / 1e6 for a in mine]
        all_lat += lat
        all_lat_ack += lat_ack
        r = {"round": k, "svc": svc, "expected": expected, "answered": len(mine),
             "others_answered": len(answers) - len(mine), "ack_ms": ack * 1e3,
             "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": max(lat) if lat else None,
             "min_ms": min(lat) if lat else None, "cpu_s": cpu,
             "bytes": sum(a["bytes"] for a in mine), "gzip_answers": coded,
             "client_lag_p99_ms": pct(client_lag, 99), "probe_registry_max_ms": probe_reg_ms,
             "probe_admin_max_ms": probe_admin_ms, "t_write_monotonic": t_mono}
        per_round.append(r)
        log(f"  {tag} round {k}: write ack {ack * 1e3:.2f} ms; {len(mine)}/{expected} answered "
            f"p50 {fmt(r['p50_ms'])} p99 {fmt(r['p99_ms'])} max {fmt(r['max_ms'])} ms after the "
            f"write was sent (first {fmt(r['min_ms'])} ms); others answered {r['others_answered']}; "
            f"dynagate CPU {cpu * 1e3:.0f} ms; {r['bytes'] / 1e6:.1f} MB of answers ({coded} gzip-coded); "
            f"client lag p99 {fmt(r['client_lag_p99_ms'])} ms; meanwhile slowest registry "
            f"/v1/status/leader {fmt(probe_reg_ms)} ms, admin GET /v1/routes {fmt(probe_admin_ms)} ms"
            + (f"; write sent at CLOCK_MONOTONIC {t_mono:.6f}" if PERF_DIR else ""))
    if perf is not None:
        perf.send_signal(signal.SIGINT)
        perf.wait(60)
    rss_after = rss_kib(dg.pids())
    w.quit()
    # Do watchers whose client went away leave? (count them a few seconds later)
    time.sleep(3)
    left = int(metric(dg, "dynagate_registry_watchers") or 0)
    fds_left = fd_count(dg.proc.pid)
    log(f"  {tag}: RSS after the rounds {rss_after / 1024:.1f} MiB; 3 s after the client "
        f"closed its {w.open} connections: {fmt(left)} watchers still counted, {fds_left} fds; "
        f"answers not coded as asked or not decoding to a JSON list: {bad_coding}")
    # The next layout starts from the same state: this one's extra instances go.
    for r in per_round:
        reg.deregister(f"{r['svc']}-extra-{tag}-{r['round']}")
    return {"layout": layout, "cpus": cpus, "watcher_nice": WATCHER_NICE, "gzip": gzip,
            "watchers": w.open, "bad_coding": bad_coding,
            "fanout_helper_answers": metric(dg, "dynagate_registry_fanout_helper_answers_total"),
            "rss_before_mib": rss_before / 1024,
            "rss_waiting_mib": rss_waiting / 1024, "rss_after_mib": rss_after / 1024,
            "setup_s": setup_s, "rounds": per_round, "p50_ms": pct(all_lat, 50),
            "p99_ms": pct(all_lat, 99), "max_ms": max(all_lat) if all_lat else None,
            "p99_after_ack_ms": pct(all_lat_ack, 99), "samples": len(all_lat),
            "spurious": spurious, "missing": missing, "watchers_left_after_close": left,
            "fds_left_after_close": fds_left,
            "watcher_kib": (rss_waiting - rss_before) / max(1, w.open),
            "probe_registry_max_ms": max(r["probe_registry_max_ms"] or 0 for r in per_round),
            "probe_admin_max_ms": max(r["probe_admin_max_ms"] or 0 for r in per_round)}


def watch_client(port, spec_path):
    """Runs in its own process. stdout carries the protocol; logs go to stderr."""
    import select
    import struct
    import zlib
    spec = json.load(open(spec_path))
    services, wait = spec["services"], spec["wait"]
    # Go's net/http and Python requests send this by default.
    accept = "Accept-Encoding: gzip\r\n" if spec.get("gzip", True) else ""
    if spec.get("idle"):
        # Diagnostic: plain keep-alive connections, each after one answered request.
        socks, failed = [], 0
        for i in range(len(services)):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                c.request("GET", "/v1/status/leader")
                r = c.getresponse()
                r.read()
                if r.status != 200:
                    raise OSError(f"status {r.status}")
                socks.append(c)
            except (OSError, http.client.HTTPException):
                failed += 1
        print(f"READY {len(socks)} {failed}", flush=True)
        sys.stdin.read()
        return
    index = {}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for s in sorted(set(services)):
        c.request("GET", f"/v1/health/service/{s}")
        r = c.getresponse()
        r.read()
        index[s] = int(r.getheader("X-Consul-Index"))
    c.close()

    def request(s, idx):
        return (f"GET /v1/health/service/{s}?index={idx}&wait={wait} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{port}\r\nUser-Agent: bench-watcher\r\n{accept}\r\n").encode()

    ep = select.epoll()
    conns = {}
    failed = 0
    for i, s in enumerate(services):
        try:
            sk = socket.create_connection(("127.0.0.1", port), timeout=10)
            sk.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sk.sendall(request(s, index[s]))
            sk.setblocking(False)
        except OSError as e:
            failed += 1
            log(f"watcher {i}: {e}")
            continue
        ep.register(sk.fileno(), select.EPOLLIN)
        conns[sk.fileno()] = {"id": i, "svc": s, "sock": sk, "buf": bytearray(), "idx": index[s]}
    print(f"READY {len(conns)} {failed}", flush=True)

    def parse(buf):
        """One complete response at the start of buf: (status, headers, length) or None."""
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = bytes(buf[:end]).decode("latin1").split("\r\n")
        status = int(lines[0].split()[1])
        h = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            h[k.strip().lower()] = v.strip()
        pos = end + 4
        if "content-length" in h:
            total = pos + int(h["content-length"])
            return (status, h, total) if len(buf) >= total else None
        if "chunked" in h.get("transfer-encoding", "").lower():
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
                pos = eol + 2 + size + 2
                if len(buf) < pos:
                    return None
                if size == 0:
                    return status, h, pos
        return None

    answers = []
    waiting = None
    hits = 0
    closed = 0
    stdin_buf = b""
    ep.register(0, select.EPOLLIN)
    while True:
        timeout = 1.0 if waiting is None else max(0.0, waiting[2] - time.monotonic())
        for fd, _ in ep.poll(timeout):
            if fd == 0:
                data = os.read(0, 65536)
                if not data:
                    return
                stdin_buf += data
                while b"\n" in stdin_buf:
                    line, stdin_buf = stdin_buf.split(b"\n", 1)
                    cmd = line.decode().split()
                    if not cmd:
                        continue
                    if cmd[0] == "CLEAR":
                        print(f"OK {len(answers)}", flush=True)
                        answers.clear()
                    elif cmd[0] == "WAIT":   # WAIT svc expected timeout grace
                        waiting = [cmd[1], int(cmd[2]), time.monotonic() + float(cmd[3]),
                                   float(cmd[4])]
                        hits = sum(1 for a in answers if a["svc"] == cmd[1])
                    elif cmd[0] == "QUIT":
                        for st in conns.values():
                            st["sock"].close()
                        return
                continue
            st = conns.get(fd)
            if st is None:
                continue
            try:
                data, anc, _, _ = st["sock"].recvmsg(1 << 20, socket.CMSG_SPACE(16))
            except BlockingIOError:
                continue
            except OSError:
                data, anc = b"", []
            if not data:
                closed += 1
                ep.unregister(fd)
                st["sock"].close()
                del conns[fd]
                answers.append({"id": st["id"], "svc": st["svc"], "status": 0, "kts": 0,
                                "uts": time.time_ns(), "bytes": 0})
                continue
            kts = 0
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(cdata) >= 16:
                    sec, nsec = struct.unpack("qq", cdata[:16])
                    kts = sec * 1_000_000_000 + nsec
            st["buf"] += data
            while True:
                got = parse(st["buf"])
                if got is None:
                    break
                status, h, total = got
                body = bytes(st["buf"][total - int(h.get("content-length", 0)):total])
                del st["buf"][:total]
                now = time.time_ns()
                coded = h.get("content-encoding") == "gzip"
                try:
                    # As a client would: decode (gzip), then it must be a JSON list.
                    body = zlib.decompress(body, 16 + zlib.MAX_WBITS) if coded else body
                    bad_body = not (body.startswith(b"[") and body.endswith(b"]"))
                except zlib.error:
                    bad_body = True
                if waiting and st["svc"] == waiting[0]:
                    hits += 1
                answers.append({"id": st["id"], "svc": st["svc"], "status": status,
                                "kts": kts or now, "uts": now, "bytes": total, "gzip": coded,
                                "bad_body": bad_body})
                try:
                    st["idx"] = max(st["idx"], int(h.get("x-consul-index", st["idx"])))
                except ValueError:
                    pass
                st["sock"].send(request(st["svc"], st["idx"]))   # re-arm, as a Consul client
        if waiting:
            now = time.monotonic()
            if hits >= waiting[1]:
                waiting[2] = min(waiting[2], now + waiting[3])   # linger for the grace time
                waiting[1] = 1 << 62
            if now >= waiting[2]:
                print("ANSWERS " + json.dumps(answers), flush=True)
                answers.clear()
                waiting = None


# --------------------------------------------------------------------------- main

def main():
    ensure_tools()
    nofile = raise_nofile()
    if nofile < 2 * WATCHERS + 1000:
        log(f"  RLIMIT_NOFILE is only {nofile}: watchers may fail")
    unknown = PARTS - ALL_PARTS
    if unknown:
        raise SystemExit(f"BENCH_FIG8_PARTS: unknown part(s) {sorted(unknown)}; known {sorted(ALL_PARTS)}")
    bad = [x for x in LAYOUTS if x not in ALL_LAYOUTS] or ([] if LAYOUTS else ["(none)"])
    if bad:
        raise SystemExit(f"BENCH_FIG8_LAYOUTS: unknown layout(s) {bad}; known {list(ALL_LAYOUTS)}")
    if "unpinned" in LAYOUTS and not LOAD_CPU:
        log("  one core: the unpinned layout is the pinned one")
    ports = [ORIGIN_BASE + i for i in range(ROUTE_SAMPLES + 1)]
    ensure_free(*ports, BASE + 95, DG_REGISTRY_PORT)
    origin = Nginx("reg-origin", origin_conf(ports), LOAD_CPU)
    wait_port(ports[0])
    if LOAD_CPU:
        os.sched_setaffinity(0, {int(LOAD_CPU)})   # clients on the load core
    raw = {}
    rates = r_empty = st = r_full = None
    spread, one, one_id = [], [], []
    fsyncs = restart_s = conn_kib = None

    # -- instance 1: routing latency on a nearly empty registry, then registration rates
    if "rates" in PARTS:
        dg = start_dynagate("dg-reg", (BASE + 93, BASE + 94, BASE + 95))
        fsyncs = fsync_rate(dg.data)
        r_empty = routing_latency(dg, ports, "empty")
        log(f"  registration -> routed (empty registry): p50 {pct(r_empty['lat'], 50) * 1e3:.2f} ms "
            f"p99 {pct(r_empty['lat'], 99) * 1e3:.2f} ms max {max(r_empty['lat']) * 1e3:.2f} ms; "
            f"ack p50 {pct(r_empty['acks'], 50) * 1e3:.2f} ms; polls p50 {pct(r_empty['polls'], 50)}")
        rates = registration_rates(dg)
        log(f"  disk: {fsyncs:.0f} fsyncs/s (4 KiB write + fsync); registrations: sequential "
            f"{rates['seq_rate']:.0f}/s (p50 {ms(rates['seq_p50']):.2f} ms p99 {ms(rates['seq_p99']):.2f} ms), "
            f"{CONC_CLIENTS} clients {rates['conc_rate']:.0f}/s (p50 {ms(rates['conc_p50']):.2f} ms "
            f"p99 {ms(rates['conc_p99']):.2f} ms)")
        dg.stop()

    # -- instance 2: the 10,000-instance state, routing at that size, watchers
    if PARTS & {"state", "routing", "spread", "one", "one-identity", "idle"}:
        dg = start_dynagate("dg-state", (DG_PORT, DG_ADMIN_PORT, DG_REGISTRY_PORT))
        time.sleep(0.5)
        rss_empty = rss_kib(dg.pids())
        st = load_state(dg)
        time.sleep(2)
        rss_loaded = rss_kib(dg.pids())
        db_mib = sum(os.path.getsize(os.path.join(dg.data, f)) for f in os.listdir(dg.data)
                     if f.startswith("registry.db")) / (1 << 20)
        log(f"  loaded {st['total']} instances / {SERVICES} services in {st['load_s']:.1f}s "
            f"({st['total'] / st['load_s']:.0f}/s; per call first 1,000 p50 {ms(st['first_p50']):.2f} ms, "
            f"last 1,000 p50 {ms(st['last_p50']):.2f} ms p99 {ms(st['last_p99']):.2f} ms); gateway had "
            f"{st['gateway_servers']} servers {st['synced_s']:.1f}s after the start; RSS "
            f"{rss_empty / 1024:.1f} -> {rss_loaded / 1024:.1f} MiB; registry.db* {db_mib:.1f} MiB")
        if "routing" in PARTS:
            r_full = routing_latency(dg, ports, "loaded")
            log(f"  registration -> routed ({st['total']} instances): p50 {pct(r_full['lat'], 50) * 1e3:.2f} ms "
                f"p99 {pct(r_full['lat'], 99) * 1e3:.2f} ms max {max(r_full['lat']) * 1e3:.2f} ms; "
                f"ack p50 {pct(r_full['acks'], 50) * 1e3:.2f} ms")
        # Each watcher part in a fresh process (same data dir): no leftovers of the one
        # before, and started with its layout's pinning (the default count of fan-out
        # helper threads follows the cores the process may use).
        first_restart = True
        for cpus in LAYOUTS:
            for part, layout, rounds, gzip, out in (
                    ("spread", "spread", WATCH_ROUNDS_SPREAD, True, spread),
                    ("one", "one", WATCH_ROUNDS_ONE, True, one),
                    ("one-identity", "one", WATCH_ROUNDS_ONE, False, one_id)):
                if part not in PARTS:
                    continue
                dg.stop()
                # Explicitly every core when unpinned: a child inherits this process's
                # affinity, which is the load core from here on.
                dg.cpus = PROXY_CPU if cpus == "pinned" else (ALL_CPUS if LOAD_CPU else None)
                t = time.perf_counter()
                dg.start()
                wait_port(dg.registry_port, 60)
                if first_restart:
                    restart_s = time.perf_counter() - t
                    first_restart = False
                time.sleep(1)
                out.append(watcher_rounds(dg, layout, rounds, gzip=gzip, cpus=cpus))
        dg.stop()
        dg.cpus = PROXY_CPU
        t = time.perf_counter()
        dg.start()
        wait_port(dg.registry_port, 60)
        if first_restart:
            restart_s = time.perf_counter() - t
        time.sleep(1)
        if "idle" in PARTS:
            conn_kib, conn_n = idle_connection_cost(dg, WATCHERS)
            log(f"  {conn_n} plain keep-alive registry connections (fresh process, same state): "
                f"{conn_kib:.1f} KiB of RSS each")
        for res in spread + one + one_id:
            res["idle_conn_kib"] = conn_kib
        dg.stop()
    origin.stop()

    na = "n/a (nginx has no registry)"
    w_label = f"{WATCHERS:,} watchers"
    rows = []
    if rates is not None:
        rows += [
            row("durable registrations/s, 1 client, sequential", na, rates["seq_rate"], "/s",
                "info (each write fsynced)", ratio=None,
                note=f"{SEQ_REGS} registrations (TTL 30s check, passing) over 100 services; per call "
                     f"p50 {ms(rates['seq_p50']):.2f} ms p99 {ms(rates['seq_p99']):.2f} ms; dynagate CPU "
                     f"{rates['seq_cpu_ms']:.2f} ms per registration; the disk does "
                     f"{fsyncs:.0f} fsyncs/s (4 KiB pwrite + fsync)"),
            row(f"durable registrations/s, {CONC_CLIENTS} concurrent clients", na, rates["conc_rate"], "/s",
                "info (each write fsynced)", ratio=None,
                note=f"{CONC_REGS} registrations, keep-alive HTTP/1.1 each; per call p50 "
                     f"{ms(rates['conc_p50']):.2f} ms p99 {ms(rates['conc_p99']):.2f} ms; dynagate CPU "
                     f"{rates['conc_cpu_ms']:.2f} ms per registration; "
                     f"{rates['conc_rate'] / rates['seq_rate']:.2f}× the sequential rate"),
        ]
    if st is not None:
        rows += [
            row(f"load {st['total']:,} instances / {SERVICES:,} services ({CONC_CLIENTS} clients)", na,
                st["load_s"], "s", "info", ratio=None,
                note=f"{st['total'] / st['load_s']:.0f} registrations/s; per call first 1,000 p50 "
                     f"{ms(st['first_p50']):.2f} ms, last 1,000 p50 {ms(st['last_p50']):.2f} ms p99 "
                     f"{ms(st['last_p99']):.2f} ms; gateway upstreams held all {st['gateway_servers']:,} "
                     f"instances {st['synced_s']:.1f}s after the first registration; restart with this "
                     f"state to registry listening {restart_s:.2f}s"),
            row(f"resident memory with {st['total']:,} instances / {SERVICES:,} services", na,
                rss_loaded / 1024, "MiB", "info", ratio=None,
                note=f"empty {rss_empty / 1024:.1f} MiB; registry.db + WAL {db_mib:.1f} MiB; the gateway "
                     f"also holds them as {SERVICES:,} upstreams"),
        ]
    for res in spread + one + one_id:
        where = ("5 per service over all " + f"{SERVICES:,} services" if res["layout"] == "spread"
                 else "all on one service (svc0)")
        coding = ("Accept-Encoding: gzip (as Go and Python clients send)" if res["gzip"]
                  else "no Accept-Encoding, identity bodies (nginx-upsync-style)")
        cores = ("dynagate on both cores, watcher client on core 1" if res["cpus"] == "unpinned"
                 else "dynagate pinned to core 0, watcher client on core 1")
        if res["watcher_nice"]:
            cores += f" at nice {res['watcher_nice']}"
        where = f"{where}, {coding}; {cores}"
        # The target is for the clients Consul's users run (gzip) with dynagate on the
        # machine's cores; identity bodies and the one-core layout are shown as info.
        target = "p99 ≤ 50 ms" if res["gzip"] and res["cpus"] == "unpinned" else "info"
        rows.append(row(f"resident memory with {w_label} waiting, {where}", na,
                        res["rss_waiting_mib"], "MiB", "≤ 200 MiB", ratio=None,
                        ok=res["rss_waiting_mib"] <= 200,
                        note=f"before the watchers {res['rss_before_mib']:.1f} MiB (the "
                             f"{st['total']:,}-instance state), i.e. {res['watcher_kib']:.1f} KiB per "
                             f"watcher (a plain keep-alive registry connection costs "
                             f"{fmt(res['idle_conn_kib'])} KiB); after the answer rounds "
                             f"{res['rss_after_mib']:.1f} MiB; 3 s after the client closed its "
                             f"connections {fmt(res['watchers_left_after_close'])} watchers still "
                             f"counted"))
        rounds = res["rounds"]
        rows.append(row(f"write → every watcher answered, p99, {w_label} {where}", na,
                        res["p99_ms"], "ms", target, ratio=None,
                        ok=(res["p99_ms"] is not None and res["p99_ms"] <= 50 and res["missing"] == 0
                            and res["bad_coding"] == 0) if target != "info" else None,
                        note=f"{len(rounds)} writes, {res['samples']:,} answers: p50 {fmt(res['p50_ms'])} "
                             f"p99 {fmt(res['p99_ms'])} max {fmt(res['max_ms'])} ms from sending the "
                             f"write (kernel receive timestamps); answers not coded as asked or "
                             f"not decoding {res['bad_coding']}; p99 after the write's ack "
                             f"{fmt(res['p99_after_ack_ms'])} ms; write ack median "
                             f"{fmt(median([r['ack_ms'] for r in rounds]))} ms; missing answers "
                             f"{res['missing']}, watchers of other services woken with an answer "
                             f"{res['spurious']}; dynagate CPU per write median "
                             f"{fmt(median([r['cpu_s'] * 1e3 for r in rounds]))} ms; answers "
                             f"{fmt(median([r['bytes'] for r in rounds]) / 1e6)} MB per write; while "
                             f"answering, the slowest registry /v1/status/leader took "
                             f"{fmt(res['probe_registry_max_ms'])} ms and admin GET /v1/routes "
                             f"{fmt(res['probe_admin_max_ms'])} ms; answers written by the "
                             f"fan-out helper threads {fmt(res['fanout_helper_answers'])}"))
    for tag, r, label in (("empty", r_empty, "1 other service"),
                          ("loaded", r_full, st and f"{st['total']:,} instances loaded")):
        if r is None:
            continue
        p99 = pct(r["lat"], 99)
        rows.append(row(f"registration → gateway routes to the new instance, p99 ({label})", na,
                        p99 * 1e3, "ms", "p99 ≤ 50 ms", ratio=None, ok=p99 <= 0.050,
                        note=f"{len(r['lat'])} samples: p50 {pct(r['lat'], 50) * 1e3:.2f} ms, max "
                             f"{max(r['lat']) * 1e3:.2f} ms (p99 of {len(r['lat'])} samples is the "
                             f"{min(len(r['lat']), int(len(r['lat']) * 0.99) + 1)}th smallest); "
                             f"registration ack p50 {pct(r['acks'], 50) * 1e3:.2f} ms; dynagate CPU "
                             f"{r['cpu_ms_per_sample']:.1f} ms per sample (one registration + one "
                             f"deregistration, the bridge's passes included); proxy GETs per "
                             f"sample median {median(r['polls'])}; non-200 answers {r['non200']}"))
    raw.update(parts=sorted(PARTS), fsyncs_per_s=fsyncs, rates=rates, state=st,
               rss_empty_kib=st and rss_empty, rss_loaded_kib=st and rss_loaded,
               db_mib=st and db_mib, restart_s=restart_s,
               routing_empty_ms=r_empty and [x * 1e3 for x in r_empty["lat"]],
               routing_loaded_ms=r_full and [x * 1e3 for x in r_full["lat"]],
               routing_empty_ack_ms=r_empty and [x * 1e3 for x in r_empty["acks"]],
               routing_loaded_ack_ms=r_full and [x * 1e3 for x in r_full["acks"]],
               routing_loaded_polls=r_full and r_full["polls"],
               layouts=LAYOUTS, watcher_nice=WATCHER_NICE,
               watchers_spread=spread, watchers_one=one, watchers_one_identity=one_id)
    save("fig8" if PARTS == ALL_PARTS else "fig8-partial", rows, raw)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--watch-client":
        watch_client(int(sys.argv[2]), sys.argv[3])
    else:
        main()
