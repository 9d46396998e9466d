//! `dynagate run`: load the stored state, then open the listeners, then serve until
//! SIGTERM/SIGINT, then drain.

use crate::files::{write_atomic, Existing};
use crate::settings::Settings;
use crate::token;
use dynagate_proxy::access_log::AccessLog;
use dynagate_proxy::{Controller, ProxyOptions};
use dynagate_store::SqliteStore;
use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;

/// Written at start so `dynagate ctl` (and people) can find the listeners.
pub const RUN_FILE: &str = "run.json";

/// Less free space than this in the data directory is worth a WARN at start.
const LOW_SPACE: u64 = 1024 * 1024;

pub fn run(settings: Settings) -> Result<(), String> {
    let data_dir = &settings.data_dir;
    let mut exposed = vec![("admin API", settings.admin_listen)];
    if settings.registry.enabled {
        exposed.push(("registry", settings.registry_listen));
    }
    for (what, addr) in exposed {
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the {what} listens beyond loopback: keep it on a private network");
        }
    }
    if settings.registry.enabled
        && settings.registry.token.is_none()
        && !settings.registry_listen.ip().is_loopback()
    {
        tracing::warn!("the registry accepts writes without a token from beyond loopback; set [registry] token");
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|e| format!("data dir {}: {e}", data_dir.display()))?;
    // A full disk does not stop a start: the stored state is served, and writes are
    // refused (507) until a commit finds space again — each write tries.
    if let Some(free) = dynagate_store::free_bytes(data_dir).filter(|&f| f < LOW_SPACE) {
        tracing::warn!(
            data_dir = %data_dir.display(),
            free_bytes = free,
            "the data directory is full or nearly: the stored state is served read-only while it is; writes (admin API, ctl, registry) that find no space are answered 507 until space is freed"
        );
    }

    let token = match std::env::var("DYNAGATE_ADMIN_TOKEN") {
        Ok(t) if t.len() >= 16 => {
            tracing::info!("admin token taken from DYNAGATE_ADMIN_TOKEN");
            t
        }
        Ok(_) => return Err("DYNAGATE_ADMIN_TOKEN must be at least 16 characters".into()),
        Err(_) => {
            let (t, created) = token::load_or_create(data_dir)?;
            let path = token::token_path(data_dir);
            if created {
                tracing::info!(path = %path.display(), "generated a new admin token (mode 0600)");
            } else {
                tracing::info!(path = %path.display(), "admin token read");
            }
            t
        }
    };

    // The stored state is loaded before any listener opens: the first request is served
    // from the last acknowledged state.
    let db = data_dir.join("dynagate.db");
    let store = SqliteStore::open(&db, settings.revisions_retained)
        .map_err(|e| format!("{}: {e}", db.display()))?;
    dynagate_proxy::runtime::set_zone(settings.zone.clone());
    // Per-worker counter shards: known before the stored state builds its records.
    dynagate_proxy::stats::set_shard_count(settings.worker_count() + 1);
    let controller = Arc::new(Controller::open(Arc::new(store)).map_err(|e| e.to_string())?);
    tracing::info!(
        revision = controller.revision(),
        upstreams = controller.config().upstreams.len(),
        routes = controller.config().routes.len(),
        "state loaded"
    );

    // The admin API, the registry bridge and their SQLite commits.
    let control_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dynagate-control")
        .enable_all()
        .build()
        .map_err(|e| format!("control runtime: {e}"))?;
    let admin_listener = control_rt
        .block_on(tokio::net::TcpListener::bind(settings.admin_listen))
        .map_err(|e| format!("admin listener {}: {e}", settings.admin_listen))?;
    let admin_addr = admin_listener.local_addr().map_err(|e| e.to_string())?;

    let registry = match settings.registry.enabled {
        true => {
            let options = dynagate_registry::RegistryOptions {
                token: settings.registry.token.clone(),
                acl_reads: settings.registry.acl_reads,
                fanout_threads: settings
                    .registry
                    .fanout_threads
                    .unwrap_or_else(dynagate_registry::default_fanout_threads),
                ..Default::default()
            };
            let registry = dynagate_registry::Registry::open(data_dir, options)
                .map_err(|e| format!("registry: {e}"))?;
            // The registry (its HTTP API, blocking queries, checks) has a thread of its
            // own: answering thousands of watchers at once never holds up the admin API,
            // and no other thread is woken by their next requests meanwhile (see
            // dynagate_registry's blocking module). Its commits run on its blocking pool.
            let registry_rt = tokio::runtime::Builder::new_current_thread()
                .thread_name("dynagate-registry")
                .enable_all()
                .build()
                .map_err(|e| format!("registry runtime: {e}"))?;
            let listener = registry_rt
                .block_on(tokio::net::TcpListener::bind(settings.registry_listen))
                .map_err(|e| format!("registry listener {}: {e}", settings.registry_listen))?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            let stats = registry.clone();
            controller.add_metrics_source(Box::new(move |out| registry_metrics(&stats, out)));
            Some((registry, registry_rt, listener, addr))
        }
        false => None,
    };
    let registry_addr = registry.as_ref().map(|(_, _, _, a)| a.to_string());

    let access_log = match &settings.access_log {
        Some(a) => Some(Arc::new(
            AccessLog::open(&a.path, a.format)
                .map_err(|e| format!("access_log {}: {e}", a.path))?,
        )),
        None => None,
    };
    let health = dynagate_proxy::health::start(
        controller.snapshots(),
        controller.subscribe(),
        settings.health_check_concurrency,
    )
    .map_err(|e| format!("health checker: {e}"))?;

    let proxy = dynagate_proxy::start(
        ProxyOptions {
            listen: settings.listen,
            workers: settings.worker_count(),
            header_read_timeout: settings.limits.header_read_timeout,
            max_header_bytes: settings.limits.max_header_bytes,
            max_headers: settings.limits.max_headers,
            max_body_bytes: settings.limits.max_body_bytes,
            underscores_in_headers: settings.limits.underscores_in_headers,
            request_buffer_bytes: settings.limits.request_buffer_bytes,
            body_read_timeout: settings.limits.body_read_timeout,
            send_timeout: settings.limits.send_timeout,
            h2_max_concurrent_streams: settings.limits.h2_max_concurrent_streams,
            access_log,
            counters: controller.counters.clone(),
        },
        controller.snapshots(),
    )
    .map_err(|e| format!("proxy listener {}: {e}", settings.listen))?;

    let run_file = data_dir.join(RUN_FILE);
    let info = serde_json::json!({
        "pid": std::process::id(),
        "proxy": proxy.local_addr.to_string(),
        "admin": admin_addr.to_string(),
        "registry": registry_addr,
    });
    // Only a convenience for `ctl` (which falls back to its flags and defaults): a gateway
    // that cannot write it (a full disk) serves all the same. Never truncated in place: a
    // failed write leaves the previous file whole.
    let wrote_run_file = match write_atomic(
        &run_file,
        format!("{info}\n").as_bytes(),
        0o644,
        Existing::Replace,
    ) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                path = %run_file.display(),
                error = %e,
                "cannot write the run file; serving anyway (`dynagate ctl` needs --admin or its default address)"
            );
            false
        }
    };
    tracing::info!(
        proxy = %proxy.local_addr,
        admin = %admin_addr,
        workers = settings.worker_count(),
        "dynagate listening"
    );

    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_options = dynagate_admin::AdminOptions {
        token,
        metrics_open: settings.metrics_open,
        registry: registry.as_ref().map(|(r, _, _, _)| {
            Arc::new(RegistryOverview(r.clone())) as Arc<dyn dynagate_admin::RegistryView>
        }),
    };
    let admin = control_rt.spawn(dynagate_admin::serve(
        admin_listener,
        controller.clone(),
        admin_options,
        async move {
            let _ = admin_stopped.await;
        },
    ));

    let (stop_registry, registry_stopped) = tokio::sync::watch::channel(false);
    let mut registry_thread = None;
    if let Some((registry, registry_rt, listener, addr)) = registry {
        tracing::info!(registry = %addr, "service registry (Consul HTTP API) listening");
        let mut stopped = registry_stopped.clone();
        let serving = registry.clone();
        let thread = std::thread::Builder::new()
            .name("dynagate-registry".into())
            .spawn(move || {
                registry_rt.block_on(async move {
                    let shutdown = async move {
                        let _ = stopped.changed().await;
                    };
                    if let Err(e) = serving.serve(listener, shutdown).await {
                        tracing::error!(error = %e, "registry stopped");
                    }
                });
            })
            .map_err(|e| format!("registry thread: {e}"))?;
        registry_thread = Some(thread);
        control_rt.spawn(crate::bridge::run(
            registry,
            controller.clone(),
            registry_stopped,
        ));
    }

    control_rt.block_on(wait_for_signal());
    tracing::info!(grace = ?settings.grace_period, "shutting down: no new connections; in-flight requests may finish");
    proxy.shutdown(settings.grace_period);
    health.stop();
    let _ = stop_admin.send(());
    let _ = stop_registry.send(true);
    let _ = control_rt
        .block_on(async { tokio::time::timeout(std::time::Duration::from_secs(5), admin).await });
    if let Some(thread) = registry_thread {
        // The registry answers its blocking queries and finishes in-flight requests (it
        // gives up after 10 s).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(11);
        while !thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    // The control runtime holds the last references to the controller and the registry:
    // with it gone, both stores close, and SQLite checkpoints each WAL into its database
    // and removes the -wal and -shm files.
    control_rt.shutdown_timeout(std::time::Duration::from_secs(5));
    if Arc::strong_count(&controller) > 1 {
        tracing::debug!("the controller is still referenced: its store closes at exit");
    }
    drop(controller);
    if wrote_run_file {
        let _ = std::fs::remove_file(&run_file);
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn registry_metrics(registry: &dynagate_registry::Registry, out: &mut String) {
    use std::fmt::Write;
    let s = registry.stats();
    let name = "dynagate_registry_fanout_helper_answers_total";
    let _ = writeln!(
        out,
        "# HELP {name} Blocking-query answers written by the registry's fan-out helper threads.\n# TYPE {name} counter\n{name} {}",
        s.fanout_helper_answers
    );
    for (name, help, value) in [
        (
            "dynagate_registry_services",
            "Registered service names.",
            s.services as u64,
        ),
        (
            "dynagate_registry_instances",
            "Registered service instances.",
            s.instances as u64,
        ),
        (
            "dynagate_registry_checks",
            "Registered checks.",
            s.checks as u64,
        ),
        (
            "dynagate_registry_kv_keys",
            "Keys in the KV store.",
            s.kv_keys as u64,
        ),
        (
            "dynagate_registry_watchers",
            "Blocking queries waiting now.",
            s.watchers as u64,
        ),
        (
            "dynagate_registry_index",
            "The registry's global index.",
            s.index,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
}

/// The dashboard's view of the registry.
struct RegistryOverview(Arc<dynagate_registry::Registry>);

impl dynagate_admin::RegistryView for RegistryOverview {
    fn services(&self) -> serde_json::Value {
        self.0.services_overview()
    }
}
