#!/usr/bin/env python3
"""Figure 9: active health checks and balancing algorithms — issue 5 §8.

1. Active checks on 10,000 servers at a 1 s interval: 10,000 upstreams of one server each,
   the servers spread over 20 ports of one nginx (`return 200`, 1 worker, core 1), so the
   checks succeed and HTTP checks keep their keep-alive connection. CPU of the dynagate
   process (utime+stime of all its threads from /proc/PID/stat over a window, as % of one
   core), with HTTP checks (`GET /`, timeout 500ms, rise 2 fall 2) and then TCP checks, minus
   the idle CPU of the same process with the same 10,000 upstreams and no checks (measured
   before and after; the mean is subtracted). The checks actually made are counted at the
   origin (nginx stub_status: requests for HTTP, accepted connections for TCP) and a sample
   of upstreams is read back through the admin API (health verdict, age of the last check).
   dynagate: 1 worker, pinned to core 0 (the health checker is its own thread). For the TCP
   kinds, a bare C loop (lib/tcp_check_floor.c) then makes the same checks at the same pace
   with dynagate's checks off, pinned the same way: the kernel's cost of the handshakes alone
   on this machine, so the row can tell dynagate's share from the floor.
2. CPU µs per request of each balancing algorithm against round_robin: wrk -t1 -c50 small
   responses, 1 worker pinned to core 0, wrk + origin on core 1, one upstream of the 2 origin
   servers, 4 s runs. Every run sends `x-user: user0..user999` (rotating) so consistent_hash
   (`hash_key: header:x-user`) spreads and every algorithm costs wrk the same. Each round
   runs rr, a1, rr, a2, ..., a5, rr (the other algorithms in an order rotated per round),
   max(ROUNDS, 5) rounds; an algorithm's ratio is its µs/request ÷ the mean of the two
   round_robin runs around it, median over rounds (the machine drifts within minutes).
   local_first: both origin servers are on 127.0.0.1, i.e. local, so it balances among them
   with round robin after its local check.
nginx column: nginx OSS has no active health checks; its balancers are not compared here.

Environment: BENCH_FIG9_PARTS=checks|balancing|checks,balancing (default both) runs only
those parts; BENCH_FIG9_KINDS=http,tcp,tcp_full (default all three) the check kinds of part 1
(tcp: the default half-open TCP check; tcp_full: "tcp_handshake":"full");
BENCH_FIG9_PERF=<dir> records `perf record -g` of dynagate during each check window into
<dir>/<kind>.data (the profiler's own cost then inflates that run's CPU figure).
"""
import os
import random
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from common import *  # noqa: E402,F401

SERVERS = int(os.environ.get("BENCH_CHECK_SERVERS", "1000" if QUICK else "10000"))
CHECK_PORTS = [BASE + 100 + i for i in range(20)]
STATUS_PORT = BASE + 121
WINDOW = 3 if QUICK else 30
BAL_SECS = 1 if QUICK else 4
BAL_ROUNDS = ROUNDS if QUICK else max(ROUNDS, 5)   # short runs, more rounds: drift averages out
ALGOS = ["round_robin", "least_conn", "consistent_hash", "p2c_ewma", "random", "local_first"]
USERS = 1000
PARTS = os.environ.get("BENCH_FIG9_PARTS", "checks,balancing").split(",")
KINDS = os.environ.get("BENCH_FIG9_KINDS", "http,tcp,tcp_full").split(",")
PERF_DIR = os.environ.get("BENCH_FIG9_PERF")
LABEL = {"http": "HTTP", "tcp": "TCP (half-open, default)", "tcp_full": "TCP (full handshake)"}


def check_origin():
    import common
    ensure_free(*CHECK_PORTS, STATUS_PORT)
    d, head = common._nginx_common("check-origin", 1)
    listens = "\n".join(f"    listen 127.0.0.1:{p} backlog=4096;" for p in CHECK_PORTS)
    conf = head + f"""
http {{
  access_log off;
  default_type text/plain;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {{
{listens}
    location / {{ return 200 "ok\\n"; }}
  }}
  server {{
    listen 127.0.0.1:{STATUS_PORT};
    location = /status {{ stub_status; }}
  }}
}}
"""
    n = Nginx("check-origin", conf, LOAD_CPU)
    wait_port(STATUS_PORT)
    return n


def stub_status():
    c = http.client.HTTPConnection("127.0.0.1", STATUS_PORT, timeout=10)
    c.request("GET", "/status")
    text = c.getresponse().read().decode()
    c.close()
    active = int(re.search(r"Active connections:\s*(\d+)", text).group(1))
    accepts, handled, requests = map(int, re.search(r"\n\s*(\d+)\s+(\d+)\s+(\d+)", text).groups())
    return {"active": active, "accepts": accepts, "requests": requests,
            "half_open": embryonic_resets(), "t": time.perf_counter()}


def embryonic_resets():
    """The kernel's count of resets that ended a handshake in SYN_RECV (TcpExt EmbryonicRsts),
    machine-wide: a half-open TCP check never reaches nginx's accept(), so it is counted here."""
    with open("/proc/net/netstat") as f:
        rows = [line.split() for line in f if line.startswith("TcpExt:")]
    return int(rows[1][rows[0].index("EmbryonicRsts")])


def check_spec(kind):
    if kind is None:
        return None
    spec = {"type": "http", "path": "/"} if kind == "http" else {"type": "tcp"}
    if kind == "tcp_full":
        spec["tcp_handshake"] = "full"
    return dict(spec, interval="1s", timeout="500ms", rise=2, fall=2)


def put_all(dg, kind):
    """(Re)defines the SERVERS upstreams hc0.. with the given check; returns seconds."""
    hc = check_spec(kind)
    t0 = time.perf_counter()
    for i in range(SERVERS):
        body = {"servers": [{"address": f"127.0.0.1:{CHECK_PORTS[i % len(CHECK_PORTS)]}"}],
                "keepalive": 32}
        if hc:
            body["health_check"] = hc
        dg.admin.ok("PUT", f"/v1/upstreams/hc{i}", body)
    return time.perf_counter() - t0


def sample_health(dg, n=100):
    """Health verdicts and last-check ages of n random upstreams (admin API)."""
    healthy = fresh = ok = 0
    now_ms = time.time() * 1e3
    for i in random.Random(7).sample(range(SERVERS), min(n, SERVERS)):
        st, out, _ = dg.admin.call("GET", f"/v1/upstreams/hc{i}")
        live = json.loads(out)["live"][0]
        healthy += live["health"] == "healthy"
        lc = live.get("last_check")
        if lc:
            ok += bool(lc["ok"])
            fresh += now_ms - lc["time_ms"] < 2500
    return {"sampled": min(n, SERVERS), "healthy": healthy, "last_ok": ok, "fresh": fresh}


def thread_cpu(pid):
    """{tid: (thread name, utime s, stime s)} of every thread of pid."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rindex(")") + 2:].split()
        out[tid] = (s[s.index("(") + 1:s.rindex(")")], int(fields[11]) / CLK_TCK,
                    int(fields[12]) / CLK_TCK)
    return out


def thread_delta(t0, t1, secs):
    """% of a core per thread name, and user / system % of the threads alive at the end."""
    by_name, user, system = {}, 0.0, 0.0
    for tid, (name, u, s) in t1.items():
        _, u0, s0 = t0.get(tid, (name, 0.0, 0.0))
        by_name[name] = by_name.get(name, 0.0) + (u - u0 + s - s0) / secs * 100
        user += (u - u0) / secs * 100
        system += (s - s0) / secs * 100
    return {k: round(v, 2) for k, v in by_name.items() if v > 0}, user, system


def window(dg, counter, perf_name=None):
    """CPU of dynagate over WINDOW seconds, and the origin's counter rate meanwhile."""
    perf = None
    if PERF_DIR and perf_name:
        os.makedirs(PERF_DIR, exist_ok=True)
        perf = subprocess.Popen(["perf", "record", "-g", "-q", "-p", str(dg.proc.pid), "-o",
                                 os.path.join(PERF_DIR, perf_name + ".data"), "--",
                                 "sleep", str(WINDOW)], stdout=subprocess.DEVNULL)
    s0 = stub_status()
    th0 = thread_cpu(dg.proc.pid)
    c0 = cpu_seconds(dg.pids())
    t0 = time.perf_counter()
    time.sleep(WINDOW)
    c1 = cpu_seconds(dg.pids())
    t1 = time.perf_counter()
    th1 = thread_cpu(dg.proc.pid)
    s1 = stub_status()
    if perf:
        perf.wait()
    secs = t1 - t0
    threads, user, system = thread_delta(th0, th1, secs)
    return {"cpu_pct": (c1 - c0) / secs * 100, "secs": secs, "threads_pct": threads,
            "user_pct": user, "sys_pct": system,
            "rate": (s1[counter] - s0[counter]) / (s1["t"] - s0["t"]),
            "active": s1["active"], "rss_mib": rss_kib(dg.pids()) / 1024}


def warm(counter, want, limit=20):
    """Until the origin sees at least `want` checks per second (1 s samples)."""
    deadline = time.perf_counter() + limit
    rate = 0
    while time.perf_counter() < deadline:
        a = stub_status()
        time.sleep(1)
        b = stub_status()
        rate = (b[counter] - a[counter]) / (b["t"] - a["t"])
        if rate >= want:
            return rate
    return rate


def health_checks(dg):
    res = {}
    res["load_s"] = put_all(dg, None)
    time.sleep(2)
    res["idle_before"] = window(dg, "requests")
    log(f"  {SERVERS} upstreams loaded in {res['load_s']:.1f}s; idle (no checks) "
        f"{res['idle_before']['cpu_pct']:.2f}% of a core, RSS {res['idle_before']['rss_mib']:.1f} MiB")
    for kind, counter in (("http", "requests"), ("tcp", "half_open"), ("tcp_full", "accepts")):
        if kind not in KINDS:
            continue
        put_s = put_all(dg, kind)
        warm_rate = warm(counter, 0.95 * SERVERS)
        w = window(dg, counter, kind)
        h = sample_health(dg)
        res[kind] = dict(w, put_s=put_s, warm_rate=warm_rate, health=h)
        log(f"  {kind.upper()} checks: enabled on {SERVERS} upstreams in {put_s:.1f}s; "
            f"{w['cpu_pct']:.2f}% of a core over {w['secs']:.0f}s; origin saw {w['rate']:.0f} "
            f"checks/s; {w['active']} connections open at the origin; RSS {w['rss_mib']:.1f} MiB; "
            f"sample of {h['sampled']}: {h['healthy']} healthy, last check ok {h['last_ok']}, "
            f"checked in the last 2.5 s {h['fresh']}; by thread (% of a core) {w['threads_pct']}, "
            f"user {w['user_pct']:.1f}% system {w['sys_pct']:.1f}%")
    res["off_s"] = put_all(dg, None)
    time.sleep(3)
    res["idle_after"] = window(dg, "requests")
    res["conns_after_off"] = res["idle_after"]["active"] - 1      # minus the stub_status one
    log(f"  checks off: idle {res['idle_after']['cpu_pct']:.2f}% of a core; origin connections "
        f"still open {res['conns_after_off']}; origin requests/s {res['idle_after']['rate']:.1f}")
    res["baseline"] = (res["idle_before"]["cpu_pct"] + res["idle_after"]["cpu_pct"]) / 2
    for kind in ("tcp", "tcp_full"):
        if kind in res:
            res[kind]["floor"] = tcp_floor(kind)
            f = res[kind]["floor"]
            log(f"  {kind.upper()} floor (bare C loop, same checks and pace): {f['cpu_pct']:.2f}% of "
                f"a core, {f['checks_per_s']:.0f} checks/s ({f['inline']} answered in connect, "
                f"{f['via_epoll']} through epoll, {f['failed']} failed)")
    return res


def tcp_floor(kind):
    """The same TCP checks made by a bare C loop (bench/lib/tcp_check_floor.c): same pace, same
    system calls, no bookkeeping — the kernel's share of a TCP check on this machine, measured
    in the same run, with dynagate's checks off."""
    need("cc", "gcc")
    exe = os.path.join(WORK, "tcp_check_floor")
    if not os.path.exists(exe):
        subprocess.check_call(["cc", "-O2", "-o", exe, os.path.join(LIB, "tcp_check_floor.c")])
    out = subprocess.run(pinned([exe, "127.0.0.1", str(CHECK_PORTS[0]), str(len(CHECK_PORTS)),
                                 str(SERVERS), str(WINDOW), "half" if kind == "tcp" else "full"],
                                PROXY_CPU), capture_output=True, text=True, check=True).stdout
    return json.loads(out)


# --------------------------------------------------------------------------- balancing

def user_script():
    """wrk script: rotating x-user header + wrk_json.lua's summary (written into WORK)."""
    with open(os.path.join(LIB, "wrk_json.lua")) as f:
        summary = f.read()
    done = summary[summary.index("done = function"):]
    path = os.path.join(WORK, "wrk_users.lua")
    with open(path, "w") as f:
        f.write(f"""-- generated by fig9_health.py
local reqs = {{}}
for i = 0, {USERS - 1} do
  reqs[#reqs + 1] = wrk.format("GET", "/", {{ Host = "{HOST}", ["x-user"] = "user" .. i }})
end
local i = 0
request = function()
  i = i + 1
  if i > #reqs then i = 1 end
  return reqs[i]
end

{done}""")
    return path


def upstream_body(algo):
    body = {"servers": [{"address": f"127.0.0.1:{p}", "weight": 1} for p in ORIGIN_PORTS],
            "keepalive": 128, "balance": algo}
    if algo == "consistent_hash":
        body["hash_key"] = "header:x-user"
    return body


def per_server_requests(dg):
    st, out, _ = dg.admin.call("GET", "/v1/upstreams/be")
    return {s["address"]: s["requests"] for s in json.loads(out)["live"]}


def balancing():
    """Each algorithm runs between two round_robin runs (rr, a1, rr, a2, ..., a5, rr); its
    ratio is its µs/request ÷ the mean of the two round_robin runs around it, so a machine
    that drifts (others compile here) moves both sides of the ratio alike."""
    origin = start_origin()
    dg = Dynagate(1, PROXY_CPU, name="dg-balance", port=BASE + 96, admin_port=BASE + 97,
                  registry_port=BASE + 98)
    dg.setup_basic()
    script = user_script()
    wrk(dg.port, 1, script=script)
    res = {a: [] for a in ALGOS}
    raw = []

    def run(algo, rnd):
        dg.admin.ok("PUT", "/v1/upstreams/be", upstream_body(algo))
        time.sleep(0.2)
        before = per_server_requests(dg)
        r = cpu_per_request(dg, BAL_SECS, 50, "/", 1, LOAD_CPU, script=script)
        after = per_server_requests(dg)
        r.update(algo=algo, round=rnd, split=[after[a] - before.get(a, 0) for a in sorted(after)])
        raw.append(r)
        log(f"  {algo:16} round {rnd}: {r['rps']:8.0f} req/s {r['cpu_us_per_req']:6.2f} µs/req "
            f"errors={r['errors']} split={r['split']}")
        if r["requests"] == 0 or r["errors"]:
            raise SystemExit(f"{algo}: {r['requests']} requests, {r['errors']} errors")
        return r

    others = ALGOS[1:]
    for rnd in range(BAL_ROUNDS):
        order = others[rnd % len(others):] + others[:rnd % len(others)]
        prev = run("round_robin", rnd)
        res["round_robin"].append(prev)
        for algo in order:
            r = run(algo, rnd)
            nxt = run("round_robin", rnd)
            res["round_robin"].append(nxt)
            r["ratio"] = r["cpu_us_per_req"] / ((prev["cpu_us_per_req"] + nxt["cpu_us_per_req"]) / 2)
            res[algo].append(r)
            prev = nxt
    dg.stop()
    origin.stop()
    return res, raw


def main():
    ensure_tools()
    raise_nofile()
    hc, bal, bal_raw = {}, {a: [] for a in ALGOS}, []
    if "checks" in PARTS:
        origin = check_origin()
        dg = Dynagate(1, PROXY_CPU)
        hc = health_checks(dg)
        dg.stop()
        origin.stop()
    if "balancing" in PARTS:
        bal, bal_raw = balancing()

    na = "n/a (no active checks in nginx OSS)"
    rows = []
    for kind in ("http", "tcp", "tcp_full"):
        if kind not in hc:
            continue
        r = hc[kind]
        net = r["cpu_pct"] - hc["baseline"]
        h = r["health"]
        what = {"http": "HTTP GET / (keep-alive)",
                "tcp": "TCP, half-open (the default: reset after the SYN-ACK; counted by the "
                       "kernel's EmbryonicRsts, nginx never accepts)",
                "tcp_full": "TCP, \"tcp_handshake\":\"full\" (connect, then reset; counted "
                            "by nginx's accepts)"}[kind]
        by_thread = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["threads_pct"].items()))
        fl = r.get("floor")
        floor_note = (f"; floor: a bare C loop making the same checks at the same pace "
                      f"(bench/lib/tcp_check_floor.c, {fl['checks_per_s']:,.0f} checks/s) costs "
                      f"{fl['cpu_pct']:.2f}% of a core in this run, dynagate ÷ floor "
                      f"{net / fl['cpu_pct']:.2f}" if fl and fl["cpu_pct"] > 0 else "")
        # The target is the default check kinds'; a full handshake is reported for contrast.
        target, ok = ("≤ 15%", net <= 15) if kind != "tcp_full" else (
            "info (the server's half of each handshake is charged to dynagate on loopback)", None)
        rows.append(row(f"active {LABEL[kind]} checks, {SERVERS:,} servers at 1 s: dynagate CPU, "
                        f"% of one core above idle", na, net, "%", target, ratio=None, ok=ok,
                        note=f"{what}, timeout 500ms; raw {r['cpu_pct']:.2f}% minus idle "
                             f"{hc['baseline']:.2f}% (same {SERVERS:,} upstreams, no checks: "
                             f"{hc['idle_before']['cpu_pct']:.2f}% before, {hc['idle_after']['cpu_pct']:.2f}% "
                             f"after) over {r['secs']:.0f} s; origin counted {r['rate']:,.0f} checks/s; "
                             f"{r['active'] - 1:,} connections open at the origin; sampled "
                             f"{h['sampled']} upstreams: {h['healthy']} healthy, {h['fresh']} checked in "
                             f"the last 2.5 s; by thread (% of a core): {by_thread}; user "
                             f"{r['user_pct']:.1f}% + system {r['sys_pct']:.1f}%; RSS {r['rss_mib']:.0f} MiB (idle "
                             f"{hc['idle_before']['rss_mib']:.0f} MiB){floor_note}"))
        if fl:
            rows.append(row(f"the same {LABEL[kind]} checks from a bare C loop (the kernel's floor "
                            f"on this machine), % of one core", na, fl["cpu_pct"], "%",
                            "info (no bookkeeping: only the check's system calls)", ratio=None,
                            ok=None, note=f"bench/lib/tcp_check_floor.c, pinned like dynagate, "
                                          f"{fl['secs']:.0f} s, {fl['checks_per_s']:,.0f} checks/s, "
                                          f"{fl['inline']:,} answered within connect, "
                                          f"{fl['via_epoll']:,} through epoll, {fl['failed']} failed"))
    for algo in ALGOS:
        runs = bal[algo]
        if not runs:
            continue
        us = median([x["cpu_us_per_req"] for x in runs])
        ratios = [x["ratio"] for x in runs if "ratio" in x]
        split = [sum(x["split"][i] for x in runs) for i in range(len(runs[0]["split"]))]
        share = ", ".join(f"{s / max(1, sum(split)) * 100:.0f}%" for s in split)
        per_round = ", ".join(f"{x['cpu_us_per_req']:.2f}" for x in runs)
        per_ratio = ", ".join(f"{x:.2f}" for x in ratios)
        note = (f"req/s {median([x['rps'] for x in runs]):,.0f}; µs per run "
                f"{per_round}{f'; ratios {per_ratio}' if ratios else ''}; split over the 2 "
                f"servers {share}; errors {sum(x['errors'] for x in runs)}")
        if algo == "consistent_hash":
            note += f"; hash_key header:x-user, {USERS} users"
        if algo == "round_robin":
            rows.append(row(f"CPU µs/request, balance {algo} (reference)", None, us, "µs",
                            "reference", ratio=1.0, note=note))
        else:
            rows.append(row(f"CPU µs/request, balance {algo}", None, us, "µs",
                            "≤ 1.1× round_robin", limit=1.1, ratio=median(ratios),
                            note=note + "; ratio = median over rounds of µs ÷ mean of the "
                                        "round_robin runs just before and after"))
    save("fig9", rows, {"health": hc, "balancing": bal_raw})


if __name__ == "__main__":
    main()
