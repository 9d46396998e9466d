//! The dashboard end to end: the real `dynagate` binary, two real backends, and Debian's
//! headless Chromium driven by `dashboard.js` (playwright-core, no browser download).
//!
//! Needs `chromium` (`/usr/bin/chromium`, or `DYNAGATE_CHROMIUM`), `node`, and
//! `npm ci` run in this directory. It fails, rather than skips, when any is missing.
//! Screenshots land in `<target>/tmp/dynagate-ui/` (`login.png`, `traffic.png`,
//! `dashboard.png`, `registry.png`, and `failure.png` when a step fails).

// The same real-servers harness as the end-to-end tests; this test uses part of it.
#[allow(dead_code)]
#[path = "../e2e/harness.rs"]
mod harness;

use harness::{Backend, Gateway, TempDir};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The whole browser part must finish within this.
const BROWSER_DEADLINE: Duration = Duration::from_secs(60);

fn ui_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui")
}

/// Chromium, node and playwright-core, or a panic saying how to install them.
fn prerequisites() -> PathBuf {
    let chromium = std::env::var_os("DYNAGATE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        chromium.is_file(),
        "{} not found: install it (apt-get install -y chromium chromium-driver) or set DYNAGATE_CHROMIUM",
        chromium.display()
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "node not found ({node:?}): install Node.js 20 or later"
    );
    let module = ui_dir().join("node_modules/playwright-core/package.json");
    assert!(
        module.is_file(),
        "{} not found: run `npm ci` in {}",
        module.display(),
        ui_dir().display()
    );
    chromium
}

/// Kills the driver (and so its browser) if the test ends early.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn server(gw: &Gateway, upstream: &str, address: &str) -> Value {
    let (status, v) = gw
        .admin(
            "GET",
            &format!("/v1/upstreams/{upstream}/servers/{address}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium() {
    let chromium = prerequisites();
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dynagate-ui");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();

    let dir = TempDir::new("dashboard");
    let gw = Gateway::start(dir.path()).await;
    let live = Backend::start("live").await;
    let doomed = Backend::start("doomed").await;
    let (live_addr, doomed_addr) = (live.addr.to_string(), doomed.addr.to_string());
    gw.ok(
        "PUT",
        "/v1/upstreams/shop",
        json!({
            "servers": [{"address": doomed_addr}, {"address": live_addr}],
            "max_fails": 1, "fail_timeout": "30s", "retries": 1,
        }),
    )
    .await;
    // An upstream with a single server, whose removal the API refuses without force.
    gw.ok(
        "PUT",
        "/v1/upstreams/solo",
        json!({"servers": [{"address": live_addr}]}),
    )
    .await;
    gw.ok(
        "PUT",
        "/v1/routes/shop",
        json!({"hosts": [], "path_prefix": "/", "upstream": "shop"}),
    )
    .await;
    for _ in 0..4 {
        assert_eq!(gw.get("x", "/").await.0, 200);
    }
    // A service in the real registry, with a TTL check, for the registry section.
    let registry = gw.registry.expect("registry enabled");
    let register = http::Request::put(format!("http://{registry}/v1/agent/service/register"))
        .body(harness::full(
            json!({"Name": "billing", "ID": "billing-1", "Port": 9, "Tags": ["v2"],
                   "Check": {"TTL": "60s", "Status": "passing", "Name": "billing heartbeat"}})
            .to_string(),
        ))
        .unwrap();
    let resp = gw.client.request(register).await.unwrap();
    assert_eq!(resp.status(), 200, "registering a service");

    // Light traffic all along, so the page has rates to show; bounded in count and time.
    let gw = Arc::new(gw);
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (gw, stop) = (gw.clone(), stop.clone());
        tokio::spawn(async move {
            for i in 0..1500u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let _ = gw.get("x", &format!("/slow?ms={}", i % 7 * 3)).await;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };

    let mut child = Command::new("node")
        .current_dir(ui_dir())
        .arg("dashboard.js")
        .args(["--admin", &format!("http://{}", gw.admin)])
        .args(["--token", &gw.token])
        .args(["--upstream", "shop"])
        .args(["--dead", &doomed_addr])
        .args(["--drain", &live_addr])
        // Added and removed from the page; nothing listens there, and no traffic goes
        // there (the test's traffic stops first).
        .args(["--extra", "127.0.0.1:9"])
        .args(["--solo", "solo"])
        .arg("--out")
        .arg(&shots)
        .arg("--chromium")
        .arg(&chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node dashboard.js");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut driver = Driver(child);
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let log = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            all.push_str(&line);
            all.push('\n');
        }
        all
    });

    let steps = async {
        let mut done = false;
        while let Some(line) = lines.recv().await {
            match line.trim() {
                "STEP kill" => {
                    doomed.kill().await;
                    // With retries, every request still succeeds, through the live server,
                    // and the failed attempts mark the dead one (max_fails 1).
                    for _ in 0..6 {
                        let (status, backend, _) = gw.get("x", "/").await;
                        assert_eq!((status, backend.as_str()), (200, "live"));
                    }
                    let s = server(&gw, "shop", &doomed_addr).await;
                    assert_eq!(s["passive_unhealthy"], true, "{s}");
                    stdin.write_all(b"killed\n").unwrap();
                    stdin.flush().unwrap();
                }
                "STEP drained" => {
                    // What the page did, the API confirms.
                    let s = server(&gw, "shop", &live_addr).await;
                    assert_eq!(s["state"], "drain", "{s}");
                    stop.store(true, Ordering::Relaxed);
                    stdin.write_all(b"checked\n").unwrap();
                    stdin.flush().unwrap();
                }
                "DONE" => done = true,
                other => eprintln!("[ui stdout] {other}"),
            }
        }
        done
    };
    let done = tokio::time::timeout(BROWSER_DEADLINE, steps).await;
    let status = if done.is_ok() {
        driver.0.wait().unwrap()
    } else {
        let _ = driver.0.kill();
        driver.0.wait().unwrap()
    };
    let output = log.join().unwrap_or_default();
    stop.store(true, Ordering::Relaxed);
    let _ = traffic.await;
    assert!(
        done.is_ok(),
        "the browser steps took over {BROWSER_DEADLINE:?}; screenshots in {}\n{output}",
        shots.display()
    );
    assert!(
        status.success() && done == Ok(true),
        "dashboard.js failed ({status}); screenshots in {}\n{output}",
        shots.display()
    );

    // Undrained, the added server removed again, and the forced removal rolled back.
    let (_, shop) = gw.admin("GET", "/v1/upstreams/shop", None).await;
    let states: Vec<(&str, &str)> = shop["live"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["address"].as_str().unwrap(), s["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [(doomed_addr.as_str(), "up"), (live_addr.as_str(), "up")]
    );
    let solo = server(&gw, "solo", &live_addr).await;
    assert_eq!(solo["state"], "up", "{solo}");
    let (_, revisions) = gw.admin("GET", "/v1/revisions?limit=1", None).await;
    let latest = revisions[0]["summary"].as_str().unwrap();
    assert!(latest.starts_with("rollback to revision"), "{latest}");
    for name in ["login.png", "traffic.png", "dashboard.png", "registry.png"] {
        let shot = shots.join(name);
        let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
        assert!(size > 5_000, "{} is {size} bytes", shot.display());
        eprintln!("screenshot: {}", shot.display());
    }
}
