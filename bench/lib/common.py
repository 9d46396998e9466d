"""Shared plumbing for the dynagate-vs-nginx benchmarks (python3 stdlib only).

Everything a figure script needs: tool installation, a temporary work directory, the
nginx origin (two backends), the nginx reference proxy, dynagate, an admin client,
wrk / h2load runners, CPU and memory readings from /proc, and the results file.

Layout of one machine (2 cores):
  * origin nginx (1 worker)  : ports BASE+1, BASE+2 (BASE+3 spare, used by churn)
  * nginx proxy              : BASE+80 (HTTP/1.1), BASE+81 (h2c)
  * dynagate                 : BASE+90 proxy, BASE+91 admin, BASE+92 registry
Pinning with 1 worker: proxies on core 0, load generator + origin on core 1.
With 2 workers nothing is pinned (everything shares both cores).
"""

import atexit
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(BENCH_DIR)
LIB = os.path.join(BENCH_DIR, "lib")
BASE = int(os.environ.get("BENCH_PORT_BASE", "28000"))
ORIGIN_PORTS = [BASE + 1, BASE + 2]
SPARE_ORIGIN_PORT = BASE + 3
NGINX_PORT, NGINX_H2_PORT = BASE + 80, BASE + 81
DG_PORT, DG_ADMIN_PORT, DG_REGISTRY_PORT = BASE + 90, BASE + 91, BASE + 92
TOKEN = "bench-token-0123456789abcdef"
HOST = "bench.example"
QUICK = os.environ.get("BENCH_QUICK") == "1"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1" if QUICK else "3"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
NCPU = os.cpu_count() or 1
PROXY_CPU, LOAD_CPU = ("0", "1") if NCPU >= 2 else (None, None)

SMALL_BODY = "hello from origin\n"           # 18 bytes
BODY_1K = "x" * 1023 + "\n"                  # 1024 bytes


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tools

def need(cmd, package):
    """Install a Debian package if `cmd` is not on PATH (the scripts set themselves up)."""
    if shutil.which(cmd):
        return
    log(f"[bench] installing {package} (for {cmd})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    if subprocess.call(sudo + ["apt-get", "install", "-y", "-q", package], env=env,
                       stdout=subprocess.DEVNULL) != 0:
        subprocess.call(sudo + ["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        subprocess.check_call(sudo + ["apt-get", "install", "-y", "-q", package], env=env,
                              stdout=subprocess.DEVNULL)
    if not shutil.which(cmd) and not os.path.exists(cmd):
        raise SystemExit(f"{cmd} still missing after installing {package}")


def ensure_tools():
    need("nginx", "nginx-light")
    need("wrk", "wrk")
    need("h2load", "nghttp2-client")
    need("taskset", "util-linux")
    need("curl", "curl")


def dynagate_bin():
    b = os.environ.get("DYNAGATE_BIN")
    if b:
        return b
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    return os.path.join(target, "release", "dynagate")


def raise_nofile():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


# --------------------------------------------------------------------------- processes

WORK = tempfile.mkdtemp(prefix="dynagate-bench-")
with open("/proc/loadavg") as _f:
    STARTED = {"time": time.strftime("%H:%M:%S"), "loadavg": _f.read().split()[:3]}
os.chmod(WORK, 0o755)
_procs = []


def _cleanup(*_):
    for p in reversed(_procs):
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except OSError:
                pass
    deadline = time.time() + 5
    for p in _procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(WORK, ignore_errors=True)


atexit.register(_cleanup)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def pinned(cmd, cpus):
    return (["taskset", "-c", cpus] + cmd) if cpus else cmd


def spawn(cmd, cpus=None, log_name=None, env=None, **kw):
    out = open(os.path.join(WORK, log_name), "ab") if log_name else subprocess.DEVNULL
    p = subprocess.Popen(pinned(cmd, cpus), stdout=out, stderr=subprocess.STDOUT, env=env,
                         preexec_fn=os.setpgrp, **kw)
    _procs.append(p)
    return p


def stop(p, sig=signal.SIGTERM, timeout=10):
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in _procs:
        _procs.remove(p)


def ensure_free(*ports, host="127.0.0.1"):
    """Refuse to start when something else already listens on a bench port (another bench
    run on the same machine would otherwise answer our load): set BENCH_PORT_BASE."""
    for port in ports:
        try:
            socket.create_connection((host, port), 0.2).close()
        except OSError:
            continue
        raise SystemExit(f"port {port} is already in use (another bench run?): "
                         f"choose another BENCH_PORT_BASE (now {BASE})")


def wait_port(port, timeout=15.0, host="127.0.0.1"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection((host, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout}s")


def children(pid):
    """Direct children of pid (nginx workers of a master)."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    s = f.read()
                if int(s[s.rindex(")") + 2:].split()[1]) == pid:
                    kids.append(int(d))
            except (OSError, ValueError):
                pass
    return kids


def cpu_seconds(pids):
    """utime+stime of each pid (all its threads) + cutime+cstime (its reaped children:
    nginx workers that exited after a reload), summed, in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rindex(")") + 2:].split()
        # utime, stime, cutime, cstime (fields 14-17 of proc(5))
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / CLK_TCK


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# --------------------------------------------------------------------------- nginx

def _nginx_common(name, workers):
    d = os.path.join(WORK, name)
    os.makedirs(d, exist_ok=True)
    user = "user root root;" if os.geteuid() == 0 else ""
    return d, f"""
{user}
worker_processes {workers};
worker_rlimit_nofile 19000;
worker_shutdown_timeout 10s;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log error;
events {{ worker_connections 18000; }}
"""


class Nginx:
    """An nginx instance with its own prefix and config under WORK (never the service)."""

    def __init__(self, name, conf, cpus=None):
        self.name, self.cpus = name, cpus
        self.dir = os.path.join(WORK, name)
        self.conf = os.path.join(self.dir, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(conf)
        subprocess.check_call(["nginx", "-t", "-q", "-p", self.dir, "-c", self.conf],
                              stdout=subprocess.DEVNULL)
        self.proc = spawn(["nginx", "-p", self.dir, "-c", self.conf], cpus, f"{name}.log")

    def pids(self):
        return [self.proc.pid] + children(self.proc.pid)

    def rewrite(self, conf):
        with open(self.conf, "w") as f:
            f.write(conf)

    def reload(self):
        return subprocess.call(["nginx", "-p", self.dir, "-c", self.conf, "-s", "reload"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self):
        stop(self.proc, signal.SIGQUIT)


def start_origin(extra_ports=()):
    """nginx as the origin: two (or three) backends answering fixed bodies."""
    d, head = _nginx_common("origin", 1)
    www = os.path.join(d, "www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "100k"), "wb") as f:
        f.write(b"y" * (100 * 1024))
    with open(os.path.join(www, "1g"), "wb") as f:   # sparse: read from page cache, no disk
        f.truncate(1 << 30)
    listens = "\n".join(f"    listen 127.0.0.1:{p};" for p in list(ORIGIN_PORTS) + list(extra_ports))
    conf = head + f"""
http {{
  access_log off;
  default_type text/plain;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {{
{listens}
    location = / {{ return 200 "{SMALL_BODY.strip()}\\n"; }}
    location = /1k {{ return 200 "{BODY_1K.strip()}\\n"; }}
    location = /100k {{ alias {www}/100k; }}
    location = /1g {{ alias {www}/1g; }}
  }}
}}
"""
    ensure_free(*ORIGIN_PORTS, *extra_ports)
    o = Nginx("origin", conf, LOAD_CPU)
    for p in ORIGIN_PORTS:
        wait_port(p)
    return o


def nginx_proxy_conf(workers, servers=None, name="proxy", extra=""):
    servers = servers or [f"127.0.0.1:{p}" for p in ORIGIN_PORTS]
    d, head = _nginx_common(name, workers)
    ups = "\n".join(f"    server {s};" for s in servers)
    loc = """
      proxy_pass http://be;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      proxy_request_buffering off;
      proxy_max_temp_file_size 0;
      client_max_body_size 0;""" + extra
    return head + f"""
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  upstream be {{
{ups}
    keepalive 128;
    keepalive_requests 10000000;
  }}
  server {{
    listen 127.0.0.1:{NGINX_PORT} reuseport;
    location / {{{loc}
    }}
  }}
  server {{
    listen 127.0.0.1:{NGINX_H2_PORT} http2 reuseport;
    location / {{{loc}
    }}
  }}
}}
"""


def start_nginx_proxy(workers, cpus=None):
    ensure_free(NGINX_PORT, NGINX_H2_PORT)
    n = Nginx("proxy", nginx_proxy_conf(workers), cpus)
    wait_port(NGINX_PORT)
    return n


# --------------------------------------------------------------------------- dynagate

class Admin:
    """Keep-alive admin API client. Each call returns (status, body, seconds)."""

    def __init__(self, port=DG_ADMIN_PORT, token=TOKEN):
        self.port, self.token = port, token
        self.conn = None
        self.last_timing = {}

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            t0 = time.perf_counter()
            try:
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                out = r.read()
                # Server-Timing: model;dur=0.012, store;dur=0.410, publish;dur=0.020 (ms)
                self.last_timing = {}
                for part in (r.getheader("Server-Timing") or "").split(","):
                    name, _, dur = part.strip().partition(";dur=")
                    if dur:
                        self.last_timing[name] = float(dur) / 1e3
                return r.status, out, time.perf_counter() - t0
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError

    def ok(self, method, path, body=None):
        st, out, dt = self.call(method, path, body)
        if st >= 300:
            raise RuntimeError(f"admin {method} {path} -> {st}: {out[:300]!r}")
        return dt


class Dynagate:
    def __init__(self, workers, cpus=None, name="dynagate", data_dir=None, port=DG_PORT,
                 admin_port=DG_ADMIN_PORT, registry_port=DG_REGISTRY_PORT):
        self.workers, self.cpus, self.name = workers, cpus, name
        self.port, self.admin_port, self.registry_port = port, admin_port, registry_port
        self.data = data_dir or os.path.join(WORK, name)
        self.proc = None
        self.start()
        self.admin = Admin(admin_port)

    def start(self, wait=True):
        binary = dynagate_bin()
        if not os.path.exists(binary):
            raise SystemExit(f"dynagate binary {binary} missing: build it (bench/run does)")
        ensure_free(self.port, self.admin_port)
        env = dict(os.environ, DYNAGATE_ADMIN_TOKEN=TOKEN, DYNAGATE_LOG="warn")
        self.t_start = time.perf_counter()
        self.proc = spawn([binary, "run", "--listen", f"127.0.0.1:{self.port}",
                           "--admin-listen", f"127.0.0.1:{self.admin_port}",
                           "--registry-listen", f"127.0.0.1:{self.registry_port}",
                           "--data-dir", self.data, "--workers", str(self.workers)],
                          self.cpus, f"{self.name}.log", env=env)
        if wait:
            wait_port(self.port, 120)
            wait_port(self.admin_port, 120)

    def pids(self):
        return [self.proc.pid]

    def stop(self):
        stop(self.proc, signal.SIGTERM, 30)

    def kill(self):
        stop(self.proc, signal.SIGKILL)

    def setup_basic(self, servers=None, host=HOST):
        servers = servers or [f"127.0.0.1:{p}" for p in ORIGIN_PORTS]
        self.admin.ok("PUT", "/v1/upstreams/be",
                      {"servers": [{"address": s, "weight": 1} for s in servers], "keepalive": 128})
        self.admin.ok("PUT", "/v1/routes/bench",
                      {"hosts": [host], "path_prefix": "/", "upstream": "be"})
        check_get(self.port, "/", SMALL_BODY.encode(), host=host)


def check_get(port, path="/", expect=None, host=HOST):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path, headers={"Host": host})
    r = c.getresponse()
    body = r.read()
    c.close()
    if r.status != 200 or (expect is not None and body != expect):
        raise RuntimeError(f"GET {path} via :{port} -> {r.status} {body[:200]!r}")


# --------------------------------------------------------------------------- load

def wrk(port, seconds, conns=50, threads=1, path="/", cpus=LOAD_CPU, env=None, timeout_s=None,
        script=None):
    """script: another wrk Lua script (it must print the same WRKJSON summary line)."""
    e = dict(os.environ, BENCH_PATH=path)
    e.update(env or {})
    cmd = pinned(["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s",
                  "-s", script or os.path.join(LIB, "wrk_json.lua"),
                  f"http://127.0.0.1:{port}{path}"], cpus)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=e,
                          timeout=timeout_s or seconds + 60)
    out = proc.stdout
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            r = json.loads(line[8:])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
            r["errors"] = sum(r[k] for k in ("err_connect", "err_read", "err_write",
                                               "err_status", "err_timeout"))
            return r
    raise RuntimeError(f"wrk printed no summary (exit {proc.returncode}):\n{out}\n{proc.stderr}")


def measured(pids_fn, load_fn):
    """Run load_fn() and return (its result, CPU seconds the proxy spent meanwhile)."""
    pids = pids_fn()
    c0 = cpu_seconds(pids)
    r = load_fn()
    c1 = cpu_seconds(pids_fn())
    return r, c1 - c0


def cpu_per_request(system, seconds, conns=50, path="/", threads=1, cpus=LOAD_CPU, env=None,
                    script=None):
    r, cpu = measured(system.pids, lambda: wrk(system.port, seconds, conns, threads, path,
                                               cpus, env, script=script))
    r["cpu_s"] = cpu
    r["cpu_us_per_req"] = cpu * 1e6 / r["requests"] if r["requests"] else None
    return r


# --------------------------------------------------------------------------- results

RESULTS = os.environ.get("BENCH_RESULTS", os.path.join(BENCH_DIR, "results", "latest"))


def save(figure, rows, raw=None):
    """rows: dicts with figure, metric, nginx, dynagate, unit, target (text), ok (bool|None)."""
    os.makedirs(RESULTS, exist_ok=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    with open(os.path.join(RESULTS, f"{figure}.json"), "w") as f:
        json.dump({"figure": figure, "rows": rows, "raw": raw, "quick": QUICK, "loadavg": load,
                   "started": STARTED,
                   "rounds": ROUNDS, "time": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)
    for r in rows:
        log(f"[{figure}] {r['metric']}: nginx={fmt(r.get('nginx'))} dynagate={fmt(r.get('dynagate'))}"
            f" {r.get('unit', '')} ratio={fmt(r.get('ratio'))} target={r.get('target', '')}"
            f" -> {verdict(r.get('ok'))}")


def row(metric, nginx, dyn, unit, target, limit=None, ratio="auto", ok=None, note=""):
    """ratio defaults to dynagate ÷ nginx; pass ratio=None for rows where it means nothing."""
    if ratio == "auto":
        ratio = dyn / nginx if nginx and dyn is not None else None
    if ok is None and limit is not None and ratio is not None:
        ok = ratio <= limit
    return {"metric": metric, "nginx": nginx, "dynagate": dyn, "unit": unit, "ratio": ratio,
            "target": target, "ok": ok, "note": note}


def fmt(x):
    if x is None:
        return "—"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.2f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def verdict(ok):
    return {True: "met", False: "MISSED", None: "info"}[ok]
