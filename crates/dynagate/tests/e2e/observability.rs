use crate::harness::*;
use serde_json::json;
use std::time::Duration;

/// Parses the metrics text with the reference Python client's parser; returns
/// `name{labels} value` lines it understood.
fn parse_with_prometheus_client(text: &str) -> String {
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f'{k}={v}' for k, v in sorted(s.labels.items()))
        print(f"{s.name}{{{labels}}} {float(s.value)}")
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client could not parse the metrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text() {
    let dir = TempDir::new("metrics");
    let gw = Gateway::start_with(dir.path(), &["--workers", "1"]).await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    b.behaviour
        .status
        .store(503, std::sync::atomic::Ordering::Relaxed);
    gw.ok(
        "PUT",
        "/v1/upstreams/shop",
        json!({"servers": [{"address": a.addr.to_string()}, {"address": b.addr.to_string()}],
               "outlier": {"consecutive_failures": 0}}),
    )
    .await;
    gw.put_route("r1", &[], "/", "shop").await;
    for _ in 0..10 {
        gw.get("x", "/").await;
    }
    let (status, _) = gw.admin_raw("GET", "/metrics", None, None).await;
    assert_eq!(status, 401, "metrics need the token by default");
    let (status, text) = gw.admin("GET", "/metrics", None).await;
    assert_eq!(status, 200);
    let text = text.as_str().unwrap().to_string();
    let samples = parse_with_prometheus_client(&text);
    let a_line = format!(
        "dynagate_requests_total{{class=2xx,route=r1,server={},upstream=shop}} 5.0",
        a.addr
    );
    let b_line = format!(
        "dynagate_requests_total{{class=5xx,route=r1,server={},upstream=shop}} 5.0",
        b.addr
    );
    assert!(samples.contains(&a_line), "{a_line} missing in\n{samples}");
    assert!(samples.contains(&b_line), "{b_line} missing in\n{samples}");
    for name in [
        "dynagate_upstream_response_seconds_bucket",
        "dynagate_server_in_flight",
        "dynagate_server_healthy",
        "dynagate_server_ejections",
        "dynagate_retries",
        "dynagate_config_revision",
    ] {
        assert!(samples.contains(name), "{name} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_combined_and_json() {
    for format in ["combined", "json"] {
        let dir = TempDir::new("accesslog");
        let log_path = dir.path().join("access.log");
        let cfg = dir.path().join("dynagate.toml");
        std::fs::write(
            &cfg,
            format!(
                "[access_log]\npath = {:?}\nformat = \"{format}\"\n",
                log_path
            ),
        )
        .unwrap();
        let gw = Gateway::start_with(dir.path(), &["--config", cfg.to_str().unwrap()]).await;
        let a = Backend::start("a").await;
        gw.put_upstream("u", &[&a]).await;
        gw.put_route("r", &["shop.example"], "/", "u").await;
        let (status, _, _) = gw.get("shop.example", "/hello?x=1").await;
        assert_eq!(status, 200);
        let (status, _, _) = gw.get("nowhere.example", "/").await;
        assert_eq!(status, 404);
        let mut text = String::new();
        let found = eventually(Duration::from_secs(3), || {
            text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let done = text.lines().count() >= 2;
            async move { done }
        })
        .await;
        assert!(found, "access log: {text:?}");
        let lines: Vec<&str> = text.lines().collect();
        if format == "combined" {
            assert!(lines[0].starts_with("127.0.0.1 - - ["), "{}", lines[0]);
            assert!(
                lines[0].contains("\"GET /hello?x=1 HTTP/1.1\" 200 1 "),
                "{}",
                lines[0]
            );
            assert!(lines[0].contains(&a.addr.to_string()), "{}", lines[0]);
            assert!(lines[1].contains("\" 404 "), "{}", lines[1]);
        } else {
            let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
            assert_eq!(first["status"], 200);
            assert_eq!(first["route"], "r");
            assert_eq!(first["upstream"], "u");
            assert_eq!(first["upstream_addr"], a.addr.to_string());
            assert_eq!(first["bytes_sent"], 1);
            assert!(first["upstream_time"].as_f64().unwrap() >= 0.0);
            assert!(
                first["total_time"].as_f64().unwrap() >= first["upstream_time"].as_f64().unwrap()
            );
            let second: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
            assert_eq!(second["status"], 404);
        }
    }
}
