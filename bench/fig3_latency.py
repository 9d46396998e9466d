#!/usr/bin/env python3
"""Figure 3: latency at a fixed moderate rate (about half of nginx's maximum).

Debian has no wrk2. The fixed-rate client is oha (crates.io; `oha -q R -c 50
--latency-correction`: requests are scheduled evenly at R/s and latency counts from the
scheduled time, so coordinated omission is corrected) when it is installed — bench/run
installs it with cargo (≈ 5 min of compiling on 2 cores). Without it (and always with
--quick) the fallback is h2load in HTTP/1.1 mode (`h2load --h1 -c50 --rps=R/50`), whose
50 clients fire their requests in synchronised bursts, so its latencies include queueing
behind the burst. nginx's maximum is measured first in the same run with wrk (1 worker
each, proxy on core 0, client + origin on core 1). Alternated, ROUNDS rounds, medians.
"""
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from common import *  # noqa: E402,F401

CONNS = 50


def fixed_rate(port, rate, seconds, cpus):
    logf = os.path.join(WORK, f"h2load-{port}-{time.time_ns()}.log")
    per_client = max(1, round(rate / CONNS))
    cmd = pinned(["h2load", "--h1", f"-c{CONNS}", "-t1", f"--rps={per_client}", f"-D{seconds}",
                  "--warm-up-time=1", f"--log-file={logf}", "-H", f":authority: {HOST}",
                  f"http://127.0.0.1:{port}/"], cpus)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    lat, bad = [], 0
    with open(logf) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 3:
                continue
            if parts[1] != "200":
                bad += 1
            lat.append(int(parts[2]))
    os.unlink(logf)
    if not lat:
        raise RuntimeError(f"h2load logged no request:\n{out[-2000:]}")
    lat.sort()

    def pct(p):
        return lat[min(len(lat) - 1, int(len(lat) * p / 100))]

    return {"requests": len(lat), "errors": bad, "rps": len(lat) / seconds,
            "target_rps": per_client * CONNS, "p50_us": pct(50), "p99_us": pct(99),
            "p999_us": pct(99.9), "max_us": lat[-1]}


def find_oha():
    for c in (os.environ.get("BENCH_OHA"), shutil.which("oha"),
              os.path.join(BENCH_DIR, ".tools", "bin", "oha"),
              os.path.expanduser("~/.cargo/bin/oha")):
        if c and os.path.exists(c):
            return c
    return None


def oha_rate(oha, port, rate, seconds, cpus):
    cmd = pinned([oha, "-z", f"{seconds}s", "-c", str(CONNS), "-q", str(rate),
                  "--latency-correction", "--no-tui", "--output-format", "json", "--host", HOST,
                  f"http://127.0.0.1:{port}/"], cpus)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    j = json.loads(out.stdout)
    codes = j.get("statusCodeDistribution", {})
    ok = int(codes.get("200", 0))
    # "aborted due to deadline" = still in flight when -z ran out: not a failure.
    bad = sum(int(v) for k, v in codes.items() if k != "200") + \
        sum(int(v) for k, v in j.get("errorDistribution", {}).items()
            if "deadline" not in k)
    p = j["latencyPercentiles"]
    return {"requests": ok, "errors": bad, "rps": j["summary"]["requestsPerSec"],
            "target_rps": rate, "p50_us": p["p50"] * 1e6, "p99_us": p["p99"] * 1e6,
            "p999_us": p["p99.9"] * 1e6, "max_us": j["summary"]["slowest"] * 1e6,
            "error_kinds": j.get("errorDistribution", {})}


def main():
    ensure_tools()
    secs = 2 if QUICK else 20
    origin = start_origin()
    ngx = start_nginx_proxy(1, PROXY_CPU)
    ngx.port = NGINX_PORT
    dg = Dynagate(1, PROXY_CPU)
    dg.setup_basic()
    wrk(ngx.port, 1)
    wrk(dg.port, 1)
    nmax = wrk(ngx.port, 2 if QUICK else 5)["rps"]
    rate = int(os.environ.get("BENCH_RATE", nmax / 2))
    oha = None if QUICK or os.environ.get("BENCH_LATENCY_TOOL") == "h2load" else find_oha()
    tool = "oha -q --latency-correction" if oha else "h2load --h1 --rps"
    measure = (lambda port: oha_rate(oha, port, rate, secs, LOAD_CPU)) if oha else \
        (lambda port: fixed_rate(port, rate, secs, LOAD_CPU))
    for s in (() if QUICK else (ngx, dg)):
        measure_warm = (lambda port: oha_rate(oha, port, rate, 2, LOAD_CPU)) if oha else \
            (lambda port: fixed_rate(port, rate, 2, LOAD_CPU))
        measure_warm(s.port)
    log(f"  nginx max {nmax:,.0f} req/s -> fixed rate {rate:,} req/s with {tool}")
    systems = {"nginx": ngx, "dynagate": dg}
    res = {k: [] for k in systems}
    raw = []
    for rnd in range(ROUNDS):
        order = ["nginx", "dynagate"] if rnd % 2 == 0 else ["dynagate", "nginx"]
        for name in order:
            pids = systems[name].pids()
            c0 = cpu_seconds(pids)
            r = measure(systems[name].port)
            r["cpu_us_per_req"] = (cpu_seconds(pids) - c0) * 1e6 / max(1, r["requests"])
            r.update(system=name, round=rnd)
            raw.append(r)
            res[name].append(r)
            log(f"  {name:8} round {rnd}: {r['rps']:8.0f} req/s p50 {r['p50_us']:.0f} µs "
                f"p99 {r['p99_us']:.0f} µs p99.9 {r['p999_us']:.0f} µs max {r['max_us']:.0f} µs "
                f"{r['cpu_us_per_req']:.2f} µs/req errors={r['errors']} {r.get('error_kinds') or ''} (loadavg {open('/proc/loadavg').read().split()[0]})")
            if r["requests"] == 0:
                raise SystemExit(f"{name}: no request completed")
    rows = []
    for key, label in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
        n = median([x[key] for x in res["nginx"]])
        d = median([x[key] for x in res["dynagate"]])
        tgt = "≤ nginx" if key != "p999_us" else "info"
        rows.append(row(f"latency {label} at {rate:,} req/s (½ nginx max), 50 conns, 1 worker",
                        float(n), float(d), "µs", tgt, limit=1.0 if key != "p999_us" else None,
                        ratio=median([a[key] / b[key] for a, b in zip(res["dynagate"], res["nginx"])]),
                        note=f"{tool}; errors nginx {sum(x['errors'] for x in res['nginx'])}, "
                             f"dynagate {sum(x['errors'] for x in res['dynagate'])}"))
    rows.append(row(f"CPU µs/request at the same fixed rate ({rate:,} req/s)",
                    median([x["cpu_us_per_req"] for x in res["nginx"]]),
                    median([x["cpu_us_per_req"] for x in res["dynagate"]]), "µs", "info (fig. 1 at equal load)",
                    ratio=median([a["cpu_us_per_req"] / b["cpu_us_per_req"]
                                  for a, b in zip(res["dynagate"], res["nginx"])])))
    ngx.stop()
    dg.stop()
    origin.stop()
    save("fig3", rows, {"nginx_max_rps": nmax, "rate": rate, "tool": tool, "runs": raw})


if __name__ == "__main__":
    main()
