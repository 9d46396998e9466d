#!/usr/bin/env python3
"""Figure 4: membership churn under load.

wrk -c50 drives each proxy (1 worker, core 0) for S seconds (S/2 without churn before
and after, to compare within the moment: the shared machine drifts) while a churn client on core 1
makes 100 membership changes per second to the upstream that serves the traffic, cycling:
add 127.0.0.1:BASE+3 (a third live origin) -> drain it -> remove it -> re-weight
127.0.0.1:BASE+2 to 2 -> back to 1. dynagate gets them through its admin API (each
change fsynced before the answer); nginx gets the same change by rewriting its config and
`nginx -s reload` (run back to back at the same target rate; the achieved rate is
reported). Failed requests = wrk's socket errors + non-2xx. Each system is also run
without churn in the same round, so throughput is compared within the round.
"""
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from common import *  # noqa: E402,F401

RATE = int(os.environ.get("BENCH_CHURN_RATE", "100"))
A, B, C = (f"127.0.0.1:{p}" for p in (ORIGIN_PORTS[0], ORIGIN_PORTS[1], SPARE_ORIGIN_PORT))


def dynagate_ops():
    srv = "/v1/upstreams/be/servers"
    return [("POST", srv, {"address": C, "weight": 1}),
            ("PATCH", f"{srv}/{C}", {"state": "drain"}),
            ("DELETE", f"{srv}/{C}", None),
            ("PATCH", f"{srv}/{B}", {"weight": 2}),
            ("PATCH", f"{srv}/{B}", {"weight": 1})]


def nginx_states():
    """The nginx server list after each step of the same cycle."""
    return [[A, B, C], [A, B, f"{C} down"], [A, B], [A, f"{B} weight=2"], [A, B]]


def churn(stop_at, step_fn, n_steps):
    """Call step_fn(i) at RATE per second until stop_at; returns stats."""
    st = {"done": 0, "failed": 0, "lat": [], "fail_samples": []}
    t0 = time.perf_counter()
    i = 0
    while True:
        due = t0 + i / RATE
        now = time.perf_counter()
        if due >= stop_at:
            break
        if due > now:
            time.sleep(due - now)
        t = time.perf_counter()
        err = step_fn(i % n_steps)
        st["lat"].append(time.perf_counter() - t)
        if err:
            st["failed"] += 1
            if len(st["fail_samples"]) < 5:
                st["fail_samples"].append(err)
        st["done"] += 1
        i += 1
    st["rate"] = st["done"] / max(1e-9, time.perf_counter() - t0)
    st["lat"].sort()
    lat = st.pop("lat")
    st["p50_ms"] = lat[len(lat) // 2] * 1e3 if lat else None
    st["p99_ms"] = lat[int(len(lat) * 0.99)] * 1e3 if lat else None
    return st


def loaded(system, secs, step_fn=None, n_steps=0):
    """wrk for secs; churn in a thread (pinned with wrk on the load core) if step_fn."""
    result = {}
    if step_fn:
        def run():
            if LOAD_CPU:
                os.sched_setaffinity(0, {int(LOAD_CPU)})
            result["churn"] = churn(time.perf_counter() + secs, step_fn, n_steps)
        th = threading.Thread(target=run)
        th.start()
    r = cpu_per_request(system, secs)
    if step_fn:
        th.join()
        r["churn"] = result["churn"]
    return r


def main():
    ensure_tools()
    secs = 2 if QUICK else 30
    origin = start_origin(extra_ports=[SPARE_ORIGIN_PORT])
    ngx = start_nginx_proxy(1, PROXY_CPU)
    ngx.port = NGINX_PORT
    dg = Dynagate(1, PROXY_CPU)
    dg.setup_basic([A, B])
    churn_admin = Admin()
    ops = dynagate_ops()

    def dg_step(i):
        m, p, b = ops[i]
        st, out, _ = churn_admin.call(m, p, b)
        return None if st < 300 else f"{m} {p} -> {st} {out[:120]!r}"

    states = nginx_states()

    def ngx_step(i):
        ngx.rewrite(nginx_proxy_conf(1, states[i]))
        rc = ngx.reload()
        return None if rc == 0 else f"nginx -s reload exit {rc}"

    wrk(ngx.port, 1)
    wrk(dg.port, 1)
    res = {(s, c): [] for s in ("nginx", "dynagate") for c in ("steady", "churn")}
    paired = {"nginx": [], "dynagate": []}
    raw = []
    half = max(1, secs // 2)
    for rnd in range(ROUNDS):
        order = ["nginx", "dynagate"] if rnd % 2 == 0 else ["dynagate", "nginx"]
        for name in order:
            system, step = (ngx, ngx_step) if name == "nginx" else (dg, dg_step)
            # steady (secs/2) -> churn (secs) -> steady (secs/2): the churn run is compared
            # with the mean of the runs right before and after it (the machine drifts).
            runs = []
            for case, length in (("steady", half), ("churn", secs), ("steady", half)):
                r = loaded(system, length, step if case == "churn" else None, len(ops))
                if name == "nginx" and case == "churn":   # back to the base config
                    ngx.rewrite(nginx_proxy_conf(1, [A, B]))
                    ngx.reload()
                    time.sleep(2)
                r.update(system=name, case=case, round=rnd)
                raw.append(r)
                res[(name, case)].append(r)
                runs.append(r)
                c = r.get("churn")
                log(f"  {name:8} {case:6} round {rnd}: {r['rps']:8.0f} req/s "
                    f"{r['cpu_us_per_req']:6.2f} µs/req errors={r['errors']} "
                    f"(connect {r['err_connect']} read {r['err_read']} write {r['err_write']} "
                    f"status {r['err_status']} timeout {r['err_timeout']})"
                    + (f" changes {c['done']} at {c['rate']:.0f}/s failed {c['failed']} "
                       f"p50 {c['p50_ms']:.2f} ms p99 {c['p99_ms']:.2f} ms {c['fail_samples'][:2]}"
                       if c else ""))
                if r["requests"] == 0:
                    raise SystemExit(f"{name}: no request completed")
            before, during, after = runs
            paired[name].append({
                "rps": during["rps"] / ((before["rps"] + after["rps"]) / 2),
                "cpu": during["cpu_us_per_req"] / ((before["cpu_us_per_req"] + after["cpu_us_per_req"]) / 2)})

    def tput_ratio(name):
        return median([p["rps"] for p in paired[name]])

    def cpu_ratio(name):
        return median([p["cpu"] for p in paired[name]])

    def errs(name, case):
        return sum(x["errors"] for x in res[(name, case)])

    def churn_note(name):
        cs = [x["churn"] for x in res[(name, "churn")]]
        return (f"{sum(c['done'] for c in cs)} changes at {median([c['rate'] for c in cs]):.0f}/s, "
                f"{sum(c['failed'] for c in cs)} refused; change round trip p50 "
                f"{median([c['p50_ms'] for c in cs]):.2f} ms p99 {median([c['p99_ms'] for c in cs]):.2f} ms")

    total = sum(x["requests"] for x in res[("dynagate", "churn")])
    rows = [
        row(f"failed requests under {RATE} changes/s for {secs}s (× {ROUNDS} rounds)",
            float(errs("nginx", "churn")), float(errs("dynagate", "churn")), "requests",
            "dynagate: 0", ratio=None, ok=errs("dynagate", "churn") == 0,
            note=f"of {total:,} dynagate requests; nginx with config rewrite + reload. "
                 f"dynagate: {churn_note('dynagate')}. nginx: {churn_note('nginx')}. "
                 f"Without churn: nginx {errs('nginx', 'steady')}, dynagate {errs('dynagate', 'steady')} errors"),
        row("throughput under churn ÷ without churn (mean of the runs before and after)",
            tput_ratio("nginx"), tput_ratio("dynagate"),
            "×", "dynagate ≥ 0.95", ratio=None, ok=tput_ratio("dynagate") >= 0.95,
            note=f"req/s without churn: nginx {median([x['rps'] for x in res[('nginx', 'steady')]]):,.0f}, "
                 f"dynagate {median([x['rps'] for x in res[('dynagate', 'steady')]]):,.0f}; under churn: "
                 f"nginx {median([x['rps'] for x in res[('nginx', 'churn')]]):,.0f}, "
                 f"dynagate {median([x['rps'] for x in res[('dynagate', 'churn')]]):,.0f}"),
        row("CPU per request under churn ÷ without churn (incl. admin API work)",
            cpu_ratio("nginx"), cpu_ratio("dynagate"), "×", "info (capacity: ≤ 1.05 ≈ ≥ 0.95 throughput)",
            ratio=None,
            note=f"without churn: nginx {median([x['cpu_us_per_req'] for x in res[('nginx', 'steady')]]):.2f}, "
                 f"dynagate {median([x['cpu_us_per_req'] for x in res[('dynagate', 'steady')]]):.2f} µs/req; "
                 f"under churn: nginx {median([x['cpu_us_per_req'] for x in res[('nginx', 'churn')]]):.2f}, "
                 f"dynagate {median([x['cpu_us_per_req'] for x in res[('dynagate', 'churn')]]):.2f} "
                 f"(nginx: live workers + exited ones reaped by the master)"),
    ]
    ngx.stop()
    dg.stop()
    origin.stop()
    save("fig4", rows, raw)


if __name__ == "__main__":
    main()
