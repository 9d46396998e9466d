//! The data directory: a start on a full disk serves the stored state and refuses writes
//! (507) until space is freed; dynagate's files are private whatever the umask.

use crate::harness::*;
use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A small tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (after a notice) where mounting is not permitted.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = TempDir::new("disk-mount");
        let path = dir.path().to_path_buf();
        std::mem::forget(dir); // removed by Drop below, after the unmount
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount");
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let _ = std::fs::remove_dir(&path);
            assert!(
                err.contains("ermission denied") || err.contains("not permitted"),
                "mount failed: {err}"
            );
            eprintln!("SKIPPED: cannot mount a tmpfs here (EPERM; the test needs root): {err}");
            return None;
        }
        Some(Tmpfs(path))
    }

    /// Writes a filler file until the file system has no byte left; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        for chunk in [64 * 1024, 4096, 1] {
            let buf = vec![0u8; chunk];
            loop {
                match f.write(&buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                    Err(e) => panic!("filling the tmpfs: {e}"),
                }
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn exists(dir: &Path, name: &str) -> bool {
    dir.join(name).exists()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn refused_for_space(status: u16, body: &Value) {
    assert_eq!(status, 507, "{body}");
    let text = body["error"].as_str().or(body.as_str()).unwrap_or_default();
    assert!(
        text.contains("is full: state is read-only until space is freed"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_start_serves_the_stored_state_and_refuses_writes_until_space_is_freed() {
    let Some(fs) = Tmpfs::mount("4m") else {
        return;
    };
    let data = fs.0.join("data");
    // The log stays off the full file system, so its lines can be read.
    let logs = TempDir::new("disk-log");
    let log = logs.path().join("gateway.log");
    let launch = |ports| Launch {
        log: Some(log.clone()),
        ports,
        ..Launch::default()
    };
    let backend = Backend::start("b1").await;

    // A first start with space: a route, an upstream, a registry key.
    let mut gw = Gateway::launch(&data, launch(None)).await;
    gw.put_upstream("u", &[&backend]).await;
    gw.put_route("r", &["disk.test"], "/", "u").await;
    let (status, _) = gw.consul("PUT", "/v1/kv/before", Some(json!("1"))).await;
    assert_eq!(status, 200);
    let ports = (gw.proxy, gw.admin, gw.registry.unwrap());
    let previous_run_file = std::fs::read_to_string(data.join("run.json")).unwrap();
    gw.sigterm();
    assert!(gw.wait_exit(Duration::from_secs(20)).await.success());
    assert!(
        !exists(&data, "dynagate.db-wal") && !exists(&data, "registry.db-wal"),
        "a clean stop checkpoints and removes the WALs"
    );
    // What a gateway killed with -9 leaves behind: its run.json.
    std::fs::write(data.join("run.json"), &previous_run_file).unwrap();

    let filler = fs.fill();
    let started_at = gw.log().len();
    let gw = Gateway::launch(&data, launch(Some(ports))).await;

    // The stored state is served.
    assert_eq!(gw.get("disk.test", "/").await.0, 200);
    let (status, routes) = gw.admin("GET", "/v1/routes", None).await;
    assert_eq!(status, 200);
    assert_eq!(routes[0]["id"], "r", "{routes}");
    let (status, kv) = gw.consul("GET", "/v1/kv/before", None).await;
    assert_eq!(status, 200, "{kv}");
    // run.json: the previous content, whole (or a new one, whole); never truncated.
    let run_file = std::fs::read_to_string(data.join("run.json")).unwrap();
    let parsed: Value = serde_json::from_str(&run_file).expect("run.json parses");
    assert!(
        run_file == previous_run_file || parsed["pid"] == gw.pid(),
        "{run_file}"
    );

    // Writes are refused, naming the cause, and change nothing.
    let before_ids = gw.admin("GET", "/v1/upstreams", None).await.1;
    let upstream = json!({"servers": [{"address": backend.addr.to_string()}]});
    for _ in 0..2 {
        let (status, body) = gw
            .admin("PUT", "/v1/upstreams/u2", Some(upstream.clone()))
            .await;
        refused_for_space(status, &body);
    }
    let (status, body) = gw.admin("DELETE", "/v1/routes/r", None).await;
    refused_for_space(status, &body);
    let (status, body) = gw
        .admin_raw(
            "POST",
            "/upstream/u",
            Some("server 127.0.0.1:1;".into()),
            Some(&gw.token),
        )
        .await;
    assert_eq!(status, 507, "dyups: {body}");
    let (status, body) = gw.consul("PUT", "/v1/kv/during", Some(json!("2"))).await;
    refused_for_space(status, &body);
    let ctl = std::process::Command::new(env!("CARGO_BIN_EXE_dynagate"))
        .args([
            "ctl",
            "--admin",
            &gw.admin.to_string(),
            "--token",
            &gw.token,
        ])
        .args([
            "upstream",
            "put",
            "u3",
            "--server",
            &backend.addr.to_string(),
        ])
        .output()
        .unwrap();
    let ctl_err = String::from_utf8_lossy(&ctl.stderr);
    assert_eq!(ctl.status.code(), Some(1), "{ctl_err}");
    assert!(
        ctl_err.contains("HTTP 507 Insufficient Storage") && ctl_err.contains("is full"),
        "{ctl_err}"
    );
    assert_eq!(gw.admin("GET", "/v1/upstreams", None).await.1, before_ids);
    assert_eq!(
        gw.get("disk.test", "/").await.0,
        200,
        "the route is still there"
    );

    let log_text = gw.log()[started_at..].to_string();
    assert!(
        log_text.contains("WARN") && log_text.contains("the data directory is full or nearly"),
        "a WARN at start:\n{log_text}"
    );
    let refusals = log_text
        .lines()
        .filter(|l| {
            l.contains("WARN") && l.contains("dynagate.db") && l.contains("writes are refused")
        })
        .count();
    assert_eq!(
        refusals, 1,
        "one WARN at the first refused write:\n{log_text}"
    );

    // Space again: writes go through by themselves, no restart.
    std::fs::remove_file(&filler).unwrap();
    gw.ok("PUT", "/v1/upstreams/u2", upstream.clone()).await;
    let (status, _) = gw.consul("PUT", "/v1/kv/after", Some(json!("3"))).await;
    assert_eq!(status, 200);
    let mut gw = gw;
    gw.sigterm();
    assert!(gw.wait_exit(Duration::from_secs(20)).await.success());

    // ... and durably.
    let gw = Gateway::launch(&data, launch(None)).await;
    let (status, u2) = gw.admin("GET", "/v1/upstreams/u2", None).await;
    assert_eq!(status, 200, "{u2}");
    assert_eq!(gw.consul("GET", "/v1/kv/after", None).await.0, 200);
    assert_eq!(gw.get("disk.test", "/").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_files_and_token_are_private_whatever_the_umask() {
    let dir = TempDir::new("disk-modes");
    let data = dir.path().join("data");
    let launch = || Launch {
        log: Some(dir.path().join("gateway.log")),
        umask: Some(0),
        ..Launch::default()
    };
    let mut gw = Gateway::launch(&data, launch()).await;
    let backend = Backend::start("b1").await;
    gw.put_upstream("u", &[&backend]).await;
    gw.put_route("r", &["modes.test"], "/", "u").await;
    let files = [
        "admin.token",
        "dynagate.db",
        "dynagate.db-wal",
        "dynagate.db-shm",
        "registry.db",
        "registry.db-wal",
        "registry.db-shm",
    ];
    for name in files {
        assert_eq!(mode(&data.join(name)), 0o600, "{name} with umask 000");
    }
    assert_eq!(mode(&data.join("run.json")), 0o644);
    gw.sigterm();
    assert!(gw.wait_exit(Duration::from_secs(20)).await.success());

    // State files of an older dynagate (0644) are tightened at the next start. (An
    // admin.token readable by others is left as it is, with a WARN to chmod it.)
    for name in &files[1..] {
        let path = data.join(name);
        if path.exists() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let gw = Gateway::launch(&data, launch()).await;
    for name in &files[1..] {
        assert_eq!(mode(&data.join(name)), 0o600, "{name} after a restart");
    }
    drop(gw);
}
