//! Consul clients no one here wrote, run against the real registry on 127.0.0.1:0:
//! py-consul (PyPI) and the npm `consul` package. Their scripts live in tests/compat/.
//!
//! Setup (CI does this before `cargo test`):
//!   python3 -m pip install -r crates/dynagate-registry/tests/compat/requirements.txt
//!   (cd crates/dynagate-registry/tests/compat && npm ci)

mod common;

use common::*;
use dynagate_registry::RegistryOptions;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn compat_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/compat")
}

/// Runs `program script url` in tests/compat with a time limit; fails the test with the
/// script's output unless it exits 0.
async fn run_script(program: &str, script: &str, url: String) {
    let dir = compat_dir();
    let program = program.to_string();
    let script_name = script.to_string();
    let script = script.to_string();
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::task::spawn_blocking(move || {
            Command::new(&program)
                .arg(&script)
                .arg(&url)
                .current_dir(&dir)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
        }),
    )
    .await
    .expect("compat script timed out")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script_name} failed ({}).\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n\
         (setup: pip install -r tests/compat/requirements.txt; cd tests/compat && npm ci)",
        out.status
    );
    println!("{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_consul_client() {
    let s = Server::start(RegistryOptions::default()).await;
    run_script("python3", "py_consul_compat.py", s.url()).await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_consul_client() {
    let s = Server::start(RegistryOptions::default()).await;
    run_script("node", "node_consul_compat.js", s.url()).await;
    s.shutdown().await;
}
