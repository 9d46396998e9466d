//! HAProxy as a child process (`haproxy -db -f CFG`: foreground, no daemon) with a
//! generated configuration that routes like the gateway under test, in a temp directory
//! of its own.
//!
//! Everything that bears on parsing is HAProxy's default as shipped: no
//! `option accept-invalid-http-request`, no `option http-buffer-request` (bodies stream
//! to the server as they come, like dynagate's `request_buffering = false` and unlike
//! nginx), `http-reuse safe`, keep-alive on both sides, `tune.bufsize` 16384 with
//! `tune.maxrewrite` 1024 (a request head over about 15 KiB is a 400),
//! `tune.http.maxhdr` 101 (the request line counts: 100 header lines). Timeouts: connect
//! 1 s (the gateway's upstreams' `connect_timeout`), client 5 s (no `timeout http-request`
//! or `http-keep-alive`: the client timeout stands for both), server 5 s, 300 ms for the
//! hung.test backend (its `read_timeout`); `retries 0` as the gateway's upstreams (HAProxy's
//! 3 retries, a second apart, answer a refused connection after the client gave up
//! waiting); one thread, as the gateway runs one worker.
//! HAProxy 2.6 refuses (400) a websocket upgrade (`Connection: upgrade`, `Upgrade:
//! websocket`) without a 24-character `Sec-WebSocket-Key`, HTTP/1.0 or not
//! (src/mux_h1.c, `h1_search_websocket_key`).
//!
//! Routing. HAProxy 2.6 routes on the Host header: `req.hdr(host)` is the header, never the
//! authority of an absolute-form target (HAProxy keeps that target and forwards it as it
//! came, a scheme's default port taken off). It need not be: its H1 parser refuses (400) a
//! request whose absolute-form authority differs from its Host header (src/h1.c, "the
//! authority must match the host header value"; `http://a:80/` matches `Host: a`), and two
//! Host headers that differ. An absolute-form request without a Host header has no host
//! here, so no route (404); dynagate answers 400 to an HTTP/1.1 request without Host.
//! The route is chosen on a host and a path made the way dynagate's routing makes them,
//! as far as converters go: the host without its port, lower case (`host_only`), without a
//! trailing dot; the path percent-decoded (all of it, where dynagate decodes unreserved
//! characters only) with repeated slashes merged (dot segments are not resolved). HAProxy
//! forwards the path as it came. Taken as a sample, `req.hdr(host)` is the last
//! comma-separated value: `Host: a.test, corpus.test` is corpus.test.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::nginx::Upstreams;

pub struct Haproxy {
    child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The haproxy binary, if one is installed.
pub fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
}

/// `haproxy -v`'s version, e.g. `2.6.12-1+deb12u4`.
pub fn version(bin: &std::path::Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("HAProxy version "))
                .and_then(|l| l.split_whitespace().next())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// The routes of main.rs's table, in the order HAProxy tries them: each host's routes
/// (longest prefix first), then the any-host `/anyhost/`, then no route (404). A host
/// whose routes do not match the path falls through to `/anyhost/`, as in dynagate.
fn config(listen: SocketAddr, u: &Upstreams) -> String {
    format!(
        r#"global
    nbthread 1

defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
    retries 0

frontend gateway
    bind {listen}
    http-request set-var(txn.host) req.hdr(host),host_only,regsub('[.]$','')
    http-request set-var(txn.path) path,url_dec,regsub('/+','/','g')
    acl h_corpus  var(txn.host) -m str corpus.test
    acl h_pub     var(txn.host) -m str pub.test
    acl h_methods var(txn.host) -m str methods.test
    acl h_upgrade var(txn.host) -m str upgrade.test
    acl h_uhost   var(txn.host) -m str uhost.test
    acl h_orig    var(txn.host) -m str orig.test
    acl h_stream  var(txn.host) -m str stream.test
    acl h_refused var(txn.host) -m str refused.test
    acl h_empty   var(txn.host) -m str empty.test
    acl h_hung    var(txn.host) -m str hung.test
    acl h_probe   var(txn.host) -m str probe.test
    acl p_root    var(txn.path) -m beg /
    acl p_public  var(txn.path) -m beg /public
    acl p_anyhost var(txn.path) -m beg /anyhost/
    acl m_get     method GET
    use_backend public   if h_corpus p_public
    use_backend main     if h_corpus p_root
    use_backend public   if h_pub p_public
    use_backend main     if h_methods p_root m_get
    use_backend main     if h_upgrade p_root
    use_backend uhost    if h_uhost p_root
    use_backend public   if h_orig p_public
    use_backend main     if h_stream p_root
    use_backend refused  if h_refused p_root
    use_backend empty    if h_empty p_root
    use_backend hung     if h_hung p_root
    use_backend probe    if h_probe p_root
    use_backend main     if p_anyhost
    default_backend no_route

backend main
    server main {main}

backend public
    server public {public}

backend uhost
    http-request set-header host internal.test
    server main {main}

backend probe
    server probe {probe}

backend refused
    server refused {refused}

backend hung
    timeout server 300ms
    server hung {hung}

backend empty
    http-request return status 503

backend no_route
    http-request return status 404
"#,
        main = u.main,
        public = u.public,
        probe = u.probe,
        refused = u.refused,
        hung = u.hung,
    )
}

impl Haproxy {
    pub async fn start(bin: &std::path::Path, u: &Upstreams) -> Haproxy {
        let dir =
            std::env::temp_dir().join(format!("dynagate-desync-haproxy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A free port: bound, read, released (haproxy binds it again right after).
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config(listen, u)).unwrap();
        let log = dir.join("haproxy.log");
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start haproxy");
        let mut haproxy = Haproxy {
            child,
            addr: listen,
            dir,
        };
        for _ in 0..250 {
            if tokio::net::TcpStream::connect(listen).await.is_ok() {
                return haproxy;
            }
            if let Ok(Some(status)) = haproxy.child.try_wait() {
                panic!(
                    "haproxy exited ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = haproxy.child.kill();
        panic!(
            "haproxy did not listen on {listen}:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}
