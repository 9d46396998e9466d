#!/usr/bin/env python3
"""Figure 7: 1 GiB streamed download and upload through the proxy.

Origin: lib/sink.py (GET /big = a sparse 1 GiB file by sendfile; PUT reads and counts the
body). Client: curl (download to /dev/null; upload `-T` of a sparse 1 GiB file, no
`Expect: 100-continue`). Proxy: 1 worker on core 0, curl + origin on core 1. nginx has
`proxy_request_buffering off` and `proxy_max_temp_file_size 0` (streams instead of
spooling to disk) and 64 KiB buffers. Proxy resident memory is sampled every 20 ms: before, peak during.
"""
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from common import *  # noqa: E402,F401

SIZE = (256 << 20) if QUICK else (1 << 30)
SINK_PORT = BASE + 4


def transfer(system, kind, bigfile):
    url = f"http://127.0.0.1:{system.port}/big"
    cmd = ["curl", "-sS", "-H", f"Host: {HOST}", "-H", "Expect:", "-o", "/dev/null",
           "-w", "%{http_code} %{size_download} %{size_upload} %{time_total}"]
    cmd += ["-T", bigfile, url.replace("/big", "/upload")] if kind == "upload" else [url]
    pids = system.pids()
    base = rss_kib(pids)
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(system.pids()))
            time.sleep(0.02)

    th = threading.Thread(target=sample)
    th.start()
    c0 = cpu_seconds(pids)
    out = subprocess.run(pinned(cmd, LOAD_CPU), capture_output=True, text=True, timeout=600)
    c1 = cpu_seconds(system.pids())
    done.set()
    th.join()
    code, down, up, secs = out.stdout.split()
    moved = int(down) if kind == "download" else int(up)
    ok = code == "200" and moved == SIZE
    return {"ok": ok, "code": code, "bytes": moved, "seconds": float(secs),
            "mib_s": moved / float(secs) / (1 << 20), "rss_before_kib": base,
            "rss_peak_kib": peak[0], "cpu_s": c1 - c0, "stderr": out.stderr[-300:]}


def main():
    ensure_tools()
    bigfile = os.path.join(WORK, "big")
    with open(bigfile, "wb") as f:
        f.truncate(SIZE)
    sink = spawn([sys.executable, os.path.join(LIB, "sink.py"), str(SINK_PORT), bigfile],
                 LOAD_CPU, "sink.log")
    wait_port(SINK_PORT)
    # nginx's default 8 × 4 KiB proxy buffers and 16 KiB body buffer make it slow at bulk
    # transfer; give it 64 KiB buffers so the reference is a tuned nginx (BENCH_NGINX_DEFAULT=1
    # keeps the defaults).
    tuned = "" if os.environ.get("BENCH_NGINX_DEFAULT") == "1" else """
      proxy_buffer_size 64k;
      proxy_buffers 8 64k;
      proxy_busy_buffers_size 128k;
      client_body_buffer_size 64k;"""
    ngx = Nginx("proxy", nginx_proxy_conf(1, [f"127.0.0.1:{SINK_PORT}"], extra=tuned), PROXY_CPU)
    ngx.port = NGINX_PORT
    wait_port(NGINX_PORT)
    dg = Dynagate(1, PROXY_CPU)
    dg.setup_basic([f"127.0.0.1:{SINK_PORT}"])
    systems = {"nginx": ngx, "dynagate": dg}
    res = {(s, k): [] for s in systems for k in ("download", "upload")}
    raw = []
    for rnd in range(ROUNDS):
        order = ["nginx", "dynagate"] if rnd % 2 == 0 else ["dynagate", "nginx"]
        for kind in ("download", "upload"):
            for name in order:
                r = transfer(systems[name], kind, bigfile)
                r.update(system=name, kind=kind, round=rnd)
                raw.append(r)
                res[(name, kind)].append(r)
                log(f"  {kind:8} {name:8} round {rnd}: {r['mib_s']:7.0f} MiB/s RSS "
                    f"{r['rss_before_kib'] / 1024:.1f} -> peak {r['rss_peak_kib'] / 1024:.1f} MiB "
                    f"cpu {r['cpu_s']:.2f}s code {r['code']} {r['stderr'].strip()}")
                if not r["ok"]:
                    raise SystemExit(f"{name} {kind} broken: {r}")
    rows = []
    gib = SIZE / (1 << 30)
    for kind in ("download", "upload"):
        n = median([x["mib_s"] for x in res[("nginx", kind)]])
        d = median([x["mib_s"] for x in res[("dynagate", kind)]])
        grow = max(x["rss_peak_kib"] - x["rss_before_kib"] for x in res[("dynagate", kind)]) / 1024
        ngrow = max(x["rss_peak_kib"] - x["rss_before_kib"] for x in res[("nginx", kind)]) / 1024
        rows.append(row(f"{gib:g} GiB {kind} throughput", n, d, "MiB/s", "≥ 0.9× nginx",
                        ratio=median([a["mib_s"] / b["mib_s"] for a, b in
                                      zip(res[("dynagate", kind)], res[("nginx", kind)])]),
                        note=f"CPU s per GiB: nginx "
                             f"{median([x['cpu_s'] for x in res[('nginx', kind)]]) / gib:.2f}, dynagate "
                             f"{median([x['cpu_s'] for x in res[('dynagate', kind)]]) / gib:.2f}"))
        rows[-1]["ok"] = rows[-1]["ratio"] >= 0.9
        rows.append(row(f"{gib:g} GiB {kind}: proxy RSS growth (peak − before)", ngrow, grow, "MiB",
                        "flat (dynagate < 16 MiB growth)", ratio=None, ok=grow < 16,
                        note=f"dynagate RSS before "
                             f"{median([x['rss_before_kib'] for x in res[('dynagate', kind)]]) / 1024:.1f} MiB"))
    ngx.stop()
    dg.stop()
    stop(sink)
    save("fig7", rows, raw)


if __name__ == "__main__":
    main()
