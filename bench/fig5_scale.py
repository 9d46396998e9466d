#!/usr/bin/env python3
"""Figure 5: scale — 10,000 upstreams × 10 servers.

* bulk load over the admin API (sequential keep-alive PUTs, each fsynced): total time and
  per-call latency at the start and at the end of the load;
* resident memory of dynagate with that state;
* one server change (PATCH weight on one server, alternating 2/1) at 10,000 upstreams and,
  on a second instance running at the same time, at 10 — the two interleaved change by
  change (CHANGES each), so the machine's moments of noise fall on both alike: the time to
  apply it (validated against the model + the snapshot rebuilt and published to the data
  plane, from the `Server-Timing` header of each answer) and the whole acknowledged admin
  round trip, which includes the durable commit (fsync); beside it the fsync p50/p99 of
  the same disk, measured in the same run;
* restart-to-serving: SIGTERM, start again, time from exec to the first proxied 200.
For contrast nginx gets the same 10,000 × 10 upstream blocks: its start-to-serving time,
resident memory, and `nginx -s reload` time. Servers of the bulk upstreams are loopback
addresses that are never contacted; one extra upstream `be` with a route serves traffic.
dynagate runs with 1 worker, not pinned (the admin API runs on its own thread).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from common import *  # noqa: E402,F401

UPSTREAMS = int(os.environ.get("BENCH_SCALE_UPSTREAMS", "1000" if QUICK else "10000"))
SERVERS = 10
# A p99 of a few hundred sub-0.1 ms samples is their third-slowest: 2,000 make it steadier.
CHANGES = 100 if QUICK else 2000


def addr(i, j):
    return f"127.{1 + i // 62500}.{(i // 250) % 250}.{1 + i % 250}:{8000 + j}"


def load(dg, n):
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        lat.append(dg.admin.ok("PUT", f"/v1/upstreams/u{i}", {
            "servers": [{"address": addr(i, j), "weight": 1} for j in range(SERVERS)],
            "keepalive": 32}))
    return time.perf_counter() - t0, lat


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))] if xs else None


def change_latency(instances):
    """One change at a time on each (instance, upstream count) in turn, CHANGES rounds; per
    instance: round trips, apply times (model + publish) and store times (commit), seconds."""
    out = [([], [], []) for _ in instances]
    for k in range(CHANGES):
        for (dg, n), (lat, apply, store) in zip(instances, out):
            i = (k * 7919) % n
            lat.append(dg.admin.ok("PATCH", f"/v1/upstreams/u{i}/servers/{addr(i, k % SERVERS)}",
                                   {"weight": 2 if (k // SERVERS) % 2 == 0 else 1}))
            t = dg.admin.last_timing
            apply.append(t.get("model", 0) + t.get("publish", 0))
            store.append(t.get("store", 0))
    return out


def disk_fsync(directory, n=300):
    """fsync latency of 4 KiB appends in `directory` (the disk under the store)."""
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    lat = []
    try:
        for _ in range(n):
            os.write(fd, b"x" * 4096)
            t = time.perf_counter()
            os.fsync(fd)
            lat.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    return lat


def time_to_serving(start_fn, port, deadline_s=60):
    """start_fn() launches; returns seconds until GET / via port answers 200."""
    t0 = time.perf_counter()
    start_fn()
    while time.perf_counter() - t0 < deadline_s:
        try:
            check_get(port, "/", SMALL_BODY.encode())
            return time.perf_counter() - t0
        except Exception:
            time.sleep(0.002)
    raise RuntimeError(f"not serving on :{port} after {deadline_s}s")


def nginx_scale_conf(n):
    ups = []
    for i in range(n):
        servers = "".join(f" server {addr(i, j)};" for j in range(SERVERS))
        ups.append(f"  upstream u{i} {{{servers} keepalive 32; }}")
    base = nginx_proxy_conf(1, name="ngx-scale")
    return base.replace("  upstream be {", "\n".join(ups) + "\n  upstream be {", 1)


def main():
    ensure_tools()
    origin = start_origin()
    raw = {}
    # -- small instance: 10 upstreams
    small = Dynagate(1, None, name="dg-small", port=BASE + 93, admin_port=BASE + 94,
                     registry_port=BASE + 95)
    load(small, 10)
    # -- big instance
    dg = Dynagate(1, None)
    dg.setup_basic()
    rss0 = rss_kib(dg.pids())
    load_s, load_lat = load(dg, UPSTREAMS)
    first, last = load_lat[:1000], load_lat[-1000:]
    log(f"  loaded {UPSTREAMS} upstreams × {SERVERS} servers in {load_s:.1f}s; per call "
        f"first 1000: p50 {pct(first, 50) * 1e3:.2f} ms, last 1000: p50 {pct(last, 50) * 1e3:.2f} ms "
        f"p99 {pct(last, 99) * 1e3:.2f} ms")
    time.sleep(1)
    rss = rss_kib(dg.pids())
    db = os.path.join(dg.data, "dynagate.db")
    db_mib = sum(os.path.getsize(os.path.join(dg.data, f)) for f in os.listdir(dg.data)
                 if f.startswith("dynagate.db")) / (1 << 20)
    (big_lat, big_apply, big_store), (small_lat, small_apply, _) = change_latency(
        [(dg, UPSTREAMS), (small, 10)])
    small.stop()
    fsync = disk_fsync(dg.data)
    log(f"  change applied p50 {pct(big_apply, 50) * 1e3:.3f} ms p99 {pct(big_apply, 99) * 1e3:.3f} ms "
        f"(at 10 upstreams p99 {pct(small_apply, 99) * 1e3:.3f} ms); store p99 "
        f"{pct(big_store, 99) * 1e3:.2f} ms; disk fsync p50 {pct(fsync, 50) * 1e3:.2f} ms p99 "
        f"{pct(fsync, 99) * 1e3:.2f} ms")
    log(f"  RSS {rss0 / 1024:.1f} -> {rss / 1024:.1f} MiB (db {db_mib:.0f} MiB); change p50 "
        f"{pct(big_lat, 50) * 1e3:.2f} ms p99 {pct(big_lat, 99) * 1e3:.2f} ms; at 10 upstreams p50 "
        f"{pct(small_lat, 50) * 1e3:.2f} ms p99 {pct(small_lat, 99) * 1e3:.2f} ms")
    restarts = []
    for _ in range(1 if QUICK else 3):
        t = time.perf_counter()
        dg.stop()
        stop_s = time.perf_counter() - t
        restarts.append((time_to_serving(lambda: dg.start(wait=False), dg.port), stop_s))
        log(f"  restart: stopped in {stop_s:.2f}s, serving {restarts[-1][0]:.3f}s after exec")
    rss_restarted = rss_kib(dg.pids())
    dg.stop()
    # -- nginx with the same upstreams, for contrast
    ngx_start = ngx_rss = ngx_reload = None
    try:
        conf = nginx_scale_conf(UPSTREAMS)
        holder = {}

        def start_nginx():
            holder["n"] = Nginx("ngx-scale", conf, None)
        ngx_start = time_to_serving(start_nginx, NGINX_PORT)
        time.sleep(1)
        ngx = holder["n"]
        ngx_rss = rss_kib(ngx.pids())
        old_workers = set(children(ngx.proc.pid))
        t = time.perf_counter()
        ngx.reload()
        while not set(children(ngx.proc.pid)) - old_workers and time.perf_counter() - t < 60:
            time.sleep(0.005)
        ngx_reload = time.perf_counter() - t      # until the new worker exists
        ngx.stop()
        log(f"  nginx with the same upstreams: serving {ngx_start:.3f}s after exec, RSS "
            f"{ngx_rss / 1024:.1f} MiB (master+worker), `nginx -s reload` to new worker {ngx_reload:.2f}s")
    except Exception as e:
        log(f"  nginx contrast failed: {e}")
    origin.stop()
    p99_big, p99_small = pct(big_lat, 99) * 1e3, pct(small_lat, 99) * 1e3
    ap99_big, ap99_small = pct(big_apply, 99) * 1e3, max(pct(small_apply, 99) * 1e3, 1e-6)
    serve = median([r[0] for r in restarts])
    label = f"{UPSTREAMS:,} upstreams × {SERVERS} servers"
    rows = [
        row(f"resident memory with {label}", ngx_rss and ngx_rss / 1024, rss / 1024, "MiB",
            "≤ 300 MiB", ok=rss / 1024 <= 300,
            note=f"dynagate empty {rss0 / 1024:.1f} MiB, after restart {rss_restarted / 1024:.1f} MiB; "
                 f"SQLite files {db_mib:.0f} MiB; nginx = master + 1 worker"),
        row(f"one server change applied (validated, snapshot rebuilt and published) p99, {label}",
            None, ap99_big, "ms", "≤ 1 ms and ≤ 2× at 10 upstreams", ratio=ap99_big / ap99_small,
            ok=ap99_big <= 1.0 and ap99_big <= 2 * ap99_small,
            note=f"p50 {pct(big_apply, 50) * 1e3:.3f} ms; at 10 upstreams p50 "
                 f"{pct(small_apply, 50) * 1e3:.3f} ms p99 {ap99_small:.3f} ms; ratio column = p99 ÷ "
                 f"p99 at 10 upstreams; from each answer's Server-Timing; {CHANGES} changes at each size, interleaved"),
        row(f"one server change acknowledged (admin round trip incl. fsync) p99, {label}", None,
            p99_big, "ms", "info: the durable commit is the disk's fsync", ratio=p99_big / p99_small,
            note=f"p50 {pct(big_lat, 50) * 1e3:.2f} ms; at 10 upstreams p50 {pct(small_lat, 50) * 1e3:.2f} "
                 f"ms p99 {p99_small:.2f} ms; of which the commit p99 {pct(big_store, 99) * 1e3:.2f} ms; "
                 f"this disk's own fsync in the same run p50 {pct(fsync, 50) * 1e3:.2f} ms p99 "
                 f"{pct(fsync, 99) * 1e3:.2f} ms"),
        row(f"restart to serving with {label}", ngx_start, serve, "s", "≤ 2 s", ratio=None,
            ok=serve <= 2.0,
            note=f"SIGTERM stop took {median([r[1] for r in restarts]):.2f}s; nginx column = cold start "
                 f"with the same upstreams in its config; nginx -s reload until its new worker runs "
                 f"{ngx_reload if ngx_reload is not None else float('nan'):.2f}s"),
        row(f"bulk load of {label} over the admin API (sequential)", None, load_s, "s",
            "info (each change fsyncs)", ratio=None,
            note=f"{UPSTREAMS / load_s:.0f} upstreams/s; per call first 1,000 p50 {pct(first, 50) * 1e3:.2f} ms, "
                 f"last 1,000 p50 {pct(last, 50) * 1e3:.2f} ms p99 {pct(last, 99) * 1e3:.2f} ms"),
    ]
    raw.update(load_s=load_s, change_big_ms=[x * 1e3 for x in big_lat],
               change_small_ms=[x * 1e3 for x in small_lat], restarts=restarts,
               apply_big_ms=[x * 1e3 for x in big_apply], apply_small_ms=[x * 1e3 for x in small_apply],
               store_big_ms=[x * 1e3 for x in big_store], disk_fsync_ms=[x * 1e3 for x in fsync])
    save("fig5", rows, raw)


if __name__ == "__main__":
    main()
