#!/usr/bin/env python3
"""Figure 2: CPU per request with 1,000 routes + 1,000 upstreams loaded vs 1 route.

Two dynagate instances (1 worker, core 0) run side by side: one with a single route, one
loaded over the admin API with 1,000 upstreams (2 servers each, the same two origins) and
1,000 routes (host h<i>.example). wrk rotates over the 1,000 hosts (or sends the one host:
same wrk script either way). The one route's host is h<N/2>.example, as long as most
rotated hosts (h100..h999: 12 bytes), so both sides send requests of the same size (the
Host and the X-Forwarded-Host sent upstream); until 2026-11-21 it was bench.example, one
byte longer. Alternated, ROUNDS rounds, medians. Also reports how long the
bulk load over HTTP took (each change is an fsynced SQLite transaction).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from common import *  # noqa: E402,F401

N = int(os.environ.get("BENCH_ROUTES", "100" if QUICK else "1000"))


def main():
    ensure_tools()
    secs = 2 if QUICK else 10
    origin = start_origin()
    one = Dynagate(1, PROXY_CPU, name="dg-one")
    # Same Host length as most of the rotated hosts (see the docstring).
    one_host = f"h{N // 2}.example"
    one.setup_basic(host=one_host)
    many = Dynagate(1, PROXY_CPU, name="dg-many", port=BASE + 93, admin_port=BASE + 94,
                    registry_port=BASE + 95)
    servers = [{"address": f"127.0.0.1:{p}", "weight": 1} for p in ORIGIN_PORTS]
    t0 = time.perf_counter()
    times = []
    for i in range(N):
        times.append(many.admin.ok("PUT", f"/v1/upstreams/u{i}", {"servers": servers, "keepalive": 128}))
    for i in range(N):
        times.append(many.admin.ok("PUT", f"/v1/routes/r{i}",
                                   {"hosts": [f"h{i}.example"], "path_prefix": "/", "upstream": f"u{i}"}))
    load_s = time.perf_counter() - t0
    # Also N more routes that all lead to one upstream (s<i>.example -> u0): per-route
    # bookkeeping on a shared upstream's servers shows up here, not in the 1:1 case.
    for i in range(N):
        many.admin.ok("PUT", f"/v1/routes/s{i}",
                      {"hosts": [f"s{i}.example"], "path_prefix": "/", "upstream": "u0"})
    times.sort()
    log(f"  loaded {N} upstreams + {N} routes in {load_s:.1f}s "
        f"(p50 {times[len(times) // 2] * 1e3:.2f} ms, p99 {times[int(len(times) * 0.99)] * 1e3:.2f} ms per call)")
    check_get(many.port, "/", SMALL_BODY.encode(), host=f"h{N - 1}.example")

    cases = {"1 route": (one, {"BENCH_HOST": one_host}),
             f"{N} routes": (many, {"BENCH_HOSTS": str(N)}),
             f"{N} routes, 1 upstream": (many, {"BENCH_HOSTS": str(N), "BENCH_HOST_PREFIX": "s"})}
    for s, env in cases.values():
        wrk(s.port, 1, env=env)
    res = {k: [] for k in cases}
    raw = []
    for rnd in range(ROUNDS):
        order = list(cases) if rnd % 2 == 0 else list(reversed(cases))
        order = order[rnd % len(order):] + order[:rnd % len(order)]
        for k in order:
            s, env = cases[k]
            r = cpu_per_request(s, secs, 50, "/", 1, LOAD_CPU, env)
            r.update(case=k, round=rnd)
            raw.append(r)
            res[k].append(r)
            log(f"  {k:22} round {rnd}: {r['rps']:9.0f} req/s {r['cpu_us_per_req']:6.2f} µs/req "
                f"errors={r['errors']}")
            if r["requests"] == 0 or r["err_status"]:
                raise SystemExit(f"{k}: broken ({r})")
    perf_dir = os.environ.get("BENCH_FIG2_PERF")
    if perf_dir:
        # Optional: one `perf record -g` of each case after the rounds (not in the figures).
        os.makedirs(perf_dir, exist_ok=True)
        for k, (s, env) in cases.items():
            tag = k.replace(" ", "_").replace(",", "")
            data = os.path.join(perf_dir, f"{tag}.data")
            perf = subprocess.Popen(["perf", "record", "-g", "-F", "1999", "-o", data, "-p",
                                     ",".join(str(p) for p in s.pids())],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            r = cpu_per_request(s, secs, 50, "/", 1, LOAD_CPU, env)
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
            out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--stdio",
                                  "--sort", "symbol", "-g", "none", "--percent-limit", "0.3"],
                                 capture_output=True, text=True).stdout
            with open(os.path.join(perf_dir, f"{tag}.txt"), "w") as f:
                f.write(f"# {k}: {r['rps']:.0f} req/s {r['cpu_us_per_req']:.2f} µs/req\n{out}")
            log(f"  perf {k}: {r['cpu_us_per_req']:.2f} µs/req -> {perf_dir}/{tag}.txt")
    base = median([x["cpu_us_per_req"] for x in res["1 route"]])
    loaded = median([x["cpu_us_per_req"] for x in res[f"{N} routes"]])
    ratio = median([a["cpu_us_per_req"] / b["cpu_us_per_req"]
                    for a, b in zip(res[f"{N} routes"], res["1 route"])])
    shared = median([x["cpu_us_per_req"] for x in res[f"{N} routes, 1 upstream"]])
    shared_ratio = median([a["cpu_us_per_req"] / b["cpu_us_per_req"]
                           for a, b in zip(res[f"{N} routes, 1 upstream"], res["1 route"])])
    rows = [
        row(f"CPU µs/request with {N} routes + {N} upstreams ÷ 1 route (dynagate, 1 worker)",
            None, loaded, "µs", "≤ 1.05× the 1-route figure", limit=1.05, ratio=ratio,
            note=f"1 route: {base:.2f} µs/req; hosts rotate over all {N} routes"),
        row(f"CPU µs/request, {N} routes all to one upstream ÷ 1 route (dynagate, 1 worker)",
            None, shared, "µs", "≤ 1.05× the 1-route figure", limit=1.05, ratio=shared_ratio,
            note="hosts s<i>.example rotate over the routes; same instance as the row above"),
        row(f"bulk load of {N} upstreams + {N} routes over the admin API (sequential, keep-alive)",
            None, load_s, "s", "info (each change fsyncs)",
            note=f"{2 * N} calls, p50 {times[len(times) // 2] * 1e3:.2f} ms, "
                 f"p99 {times[int(len(times) * 0.99)] * 1e3:.2f} ms per call; "
                 f"RSS after load {rss_kib(many.pids()) / 1024:.0f} MiB"),
    ]
    one.stop()
    many.stop()
    origin.stop()
    save("fig2", rows, raw)


if __name__ == "__main__":
    main()
