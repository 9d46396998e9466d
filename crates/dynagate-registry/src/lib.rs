//! dynagate's embedded service registry, speaking the Consul HTTP API.
//!
//! - [`Registry::open`] loads `<data-dir>/registry.db` (SQLite, WAL, `synchronous=FULL`).
//! - [`Registry::start`] starts check runners, TTL timers and the reaper on the current
//!   tokio runtime ([`Registry::serve`] calls it too).
//! - [`Registry::serve`] answers the Consul HTTP API on a listener.
//! - [`Registry::subscribe`] tells of every change; [`Registry::upstreams`] derives the
//!   upstream server lists from services and the nginx-upsync KV layout.
//!
//! Every change is committed to the store before it is applied in memory and
//! acknowledged; all reads are answered from memory.

mod api;
mod blocking;
mod checks;
pub mod derive;
pub mod duration;
mod kv;
pub mod model;
mod ops;
pub mod sqlite;
mod state;
pub mod store;

/// Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): the HTTP/1 request-head
/// reader of the registry's own server. Not an API; nothing else may use it.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::api::http1::{fuzz_parse_head as parse_head, FuzzHead};
}

pub use derive::{Source, UpstreamServer};
pub use model::Health;
pub use store::{RegistryStore, StoreError};

use crate::model::{CheckDef, CheckKind, CheckStatus};
use crate::state::State;
use crate::store::{Batch, Op};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};

/// How many index values a volatile change (a check status) reserves in the store at once,
/// so that the index never goes backwards across a restart without an fsync per change.
const INDEX_RESERVE: u64 = 1024;

#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// When set, writes need this token (`X-Consul-Token`, `Authorization: Bearer`,
    /// `?token=`); otherwise 403.
    pub token: Option<String>,
    /// With a token: reads need it too (`/v1/status/*` excepted, it is a liveness ping).
    pub acl_reads: bool,
    /// The single node every service lives on.
    pub node_name: String,
    /// The node's address: what instances without a ServiceAddress resolve to.
    pub node_address: String,
    pub datacenter: String,
    /// At most this many HTTP/TCP checks run at the same time.
    pub check_concurrency: usize,
    /// `DeregisterCriticalServiceAfter` below this is raised to it (Consul: 1 minute).
    pub min_deregister_after: Duration,
    /// How often the reaper looks for services to deregister (Consul: 30 s).
    pub reap_interval: Duration,
    /// Blocking queries without `wait` (Consul: 5 minutes).
    pub default_wait: Duration,
    /// Cap on `wait` (Consul: 10 minutes).
    pub max_wait: Duration,
    /// Concurrent HTTP connections served; more wait in the listen backlog.
    pub max_connections: usize,
    /// Threads that help the registry's thread write the answers of a large fan-out
    /// pass (0: it writes them alone). Default: [`default_fanout_threads`].
    pub fanout_threads: usize,
    /// A pass answering at least this many blocking queries shares its writes with the
    /// fan-out threads; smaller ones are written by the registry's thread alone.
    pub fanout_parallel_min: usize,
}

/// Fan-out helper threads by default: one fewer than the cores this process may run on,
/// at most 3 (0 on one core). See [`RegistryOptions::fanout_threads`].
pub fn default_fanout_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
        - 1
}

/// Most fan-out helper threads accepted.
pub const MAX_FANOUT_THREADS: usize = 64;

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            token: None,
            acl_reads: false,
            node_name: "dynagate".into(),
            node_address: "127.0.0.1".into(),
            datacenter: "dc1".into(),
            check_concurrency: 64,
            min_deregister_after: Duration::from_secs(60),
            reap_interval: Duration::from_secs(30),
            default_wait: Duration::from_secs(300),
            max_wait: Duration::from_secs(600),
            max_connections: 16_384,
            fanout_threads: default_fanout_threads(),
            fanout_parallel_min: 256,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot create registry data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
}

/// Failure of an API operation: an HTTP status and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub status: u16,
    pub msg: String,
}

impl ApiError {
    pub fn new(status: u16, msg: impl Into<String>) -> Self {
        ApiError {
            status,
            msg: msg.into(),
        }
    }
    pub fn bad_request(msg: impl Into<String>) -> Self {
        ApiError::new(400, msg)
    }
    pub fn not_found(msg: impl Into<String>) -> Self {
        ApiError::new(404, msg)
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        ApiError::new(500, msg)
    }
}

/// What a planned write does: the ops to commit, and the answer to give.
pub(crate) struct Planned<R> {
    pub ops: Vec<Op>,
    pub result: R,
}

struct Writer {
    /// Highest index value the store guarantees we will not go below after a restart.
    reserved: u64,
    /// Ops not committed yet that go with the next batch (the node ID when the first
    /// start found the disk full).
    pending: Vec<Op>,
}

pub struct Registry {
    pub(crate) opts: RegistryOptions,
    store: Box<dyn RegistryStore>,
    pub(crate) state: RwLock<State>,
    writer: Mutex<Writer>,
    index_tx: watch::Sender<u64>,
    pub(crate) shutdown_tx: watch::Sender<bool>,
    pub(crate) node_id: String,
    started: AtomicBool,
    runtime: Mutex<Option<tokio::runtime::Handle>>,
    /// Check ID -> its runner task.
    runners: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    background: Mutex<Vec<tokio::task::AbortHandle>>,
    pub(crate) check_permits: Arc<Semaphore>,
    /// Blocking queries waiting now.
    pub(crate) watchers: std::sync::atomic::AtomicUsize,
    /// Read answers by request key, each valid at the global index it was rendered at.
    pub(crate) rendered: Mutex<blocking::RenderCache>,
    /// Blocking queries waiting for a change.
    pub(crate) fanout: blocking::Fanout,
    weak_self: Weak<Registry>,
}

/// Registry-derived upstreams at one registry index: see [`Registry::upstream_update`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUpdate {
    /// The registry index of this view: the `since` of the next update.
    pub index: u64,
    /// `None`: `upstreams` holds every derived upstream. `Some(names)`: only these names
    /// may have changed; `upstreams` holds those of them that still derive to servers (a
    /// name missing there has nothing left in the registry).
    pub changed: Option<std::collections::BTreeSet<String>>,
    pub upstreams: BTreeMap<String, Vec<UpstreamServer>>,
}

/// Sizes of the registry, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryStats {
    /// Distinct service names.
    pub services: usize,
    /// Registered service instances.
    pub instances: usize,
    pub checks: usize,
    pub kv_keys: usize,
    /// Blocking queries waiting now.
    pub watchers: usize,
    pub index: u64,
    /// Blocking-query answers written by the fan-out helper threads since start.
    pub fanout_helper_answers: u64,
}

impl Registry {
    /// Opens (creating if needed) `<data_dir>/registry.db`.
    pub fn open(data_dir: &Path, options: RegistryOptions) -> Result<Arc<Registry>, RegistryError> {
        std::fs::create_dir_all(data_dir).map_err(|e| RegistryError::DataDir {
            path: data_dir.display().to_string(),
            source: e,
        })?;
        let store = sqlite::SqliteStore::open(&data_dir.join("registry.db"))?;
        Registry::with_store(Box::new(store), options)
    }

    /// A registry on any store (the etcd store will come this way).
    pub fn with_store(
        store: Box<dyn RegistryStore>,
        mut options: RegistryOptions,
    ) -> Result<Arc<Registry>, RegistryError> {
        options.check_concurrency = options.check_concurrency.max(1);
        options.max_connections = options.max_connections.max(1);
        options.fanout_threads = options.fanout_threads.min(MAX_FANOUT_THREADS);
        let stored = store.load()?;
        let mut node_id = stored
            .meta
            .iter()
            .find(|(k, _)| k == "node_id")
            .map(|(_, v)| v.clone());
        let index = stored.index.max(1);
        let mut pending = Vec::new();
        if node_id.is_none() {
            let id = new_uuid();
            let op = Op::SetMeta("node_id".into(), id.clone());
            match store.commit(&Batch {
                index,
                ops: vec![op.clone()],
            }) {
                Ok(()) => {}
                // A first start on a full disk: the ID is kept with the first write that
                // gets through.
                Err(StoreError::Full(_)) => pending.push(op),
                Err(e) => return Err(e.into()),
            }
            node_id = Some(id);
        }
        let state = State::new(
            index,
            stored.services,
            stored.checks,
            stored.kv,
            Instant::now(),
        );
        let (index_tx, _) = watch::channel(state.index);
        let (shutdown_tx, _) = watch::channel(false);
        Ok(Arc::new_cyclic(|weak_self| Registry {
            weak_self: weak_self.clone(),
            check_permits: Arc::new(Semaphore::new(options.check_concurrency)),
            watchers: std::sync::atomic::AtomicUsize::new(0),
            rendered: Mutex::new(blocking::RenderCache::default()),
            fanout: blocking::Fanout::default(),
            opts: options,
            store,
            state: RwLock::new(state),
            writer: Mutex::new(Writer {
                reserved: index,
                pending,
            }),
            index_tx,
            shutdown_tx,
            node_id: node_id.unwrap_or_default(),
            started: AtomicBool::new(false),
            runtime: Mutex::new(None),
            runners: Mutex::new(HashMap::new()),
            background: Mutex::new(Vec::new()),
        }))
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.opts
    }

    pub fn stats(&self) -> RegistryStats {
        let st = self.state.read();
        RegistryStats {
            services: st.by_name.len(),
            instances: st.services.len(),
            checks: st.checks.len(),
            kv_keys: st.kv.len(),
            watchers: self.watchers.load(Ordering::Relaxed),
            index: st.index,
            fanout_helper_answers: self.fanout.helper_answers.load(Ordering::Relaxed),
        }
    }

    /// Every service with its instances and their checks, for the dashboard:
    /// `[{"name","tags","instances":[{"id","address","port","tags","health",
    /// "checks":[{"id","name","type","status","output"}]}]}]`.
    pub fn services_overview(&self) -> serde_json::Value {
        let st = self.state.read();
        let services: Vec<serde_json::Value> = st
            .by_name
            .iter()
            .map(|(name, ids)| {
                let mut tags = std::collections::BTreeSet::new();
                let instances: Vec<serde_json::Value> = ids
                    .iter()
                    .filter_map(|id| st.services.get(id))
                    .map(|svc| {
                        tags.extend(svc.tags.iter().cloned());
                        let checks: Vec<serde_json::Value> = st
                            .checks_of(&svc.id)
                            .map(|c| {
                                serde_json::json!({
                                    "id": c.def.id,
                                    "name": c.def.name,
                                    "type": c.def.kind.type_name(),
                                    "status": c.rt.status.as_str(),
                                    "output": c.rt.output,
                                })
                            })
                            .collect();
                        let address = if svc.address.is_empty() {
                            self.opts.node_address.as_str()
                        } else {
                            svc.address.as_str()
                        };
                        serde_json::json!({
                            "id": svc.id,
                            "address": address,
                            "port": svc.port,
                            "tags": svc.tags,
                            "health": st.service_health(&svc.id).as_str(),
                            "checks": checks,
                        })
                    })
                    .collect();
                serde_json::json!({"name": name, "tags": tags, "instances": instances})
            })
            .collect();
        serde_json::Value::Array(services)
    }

    /// The current global index.
    pub fn index(&self) -> u64 {
        self.state.read().index
    }

    /// Receives the global index after every change (services, checks, statuses, KV).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.index_tx.subscribe()
    }

    /// The upstreams derived from registered services (with their live health) and the
    /// nginx-upsync KV layout `upstreams/<name>/<host>:<port>`. See [`derive`].
    pub fn upstreams(&self) -> BTreeMap<String, Vec<UpstreamServer>> {
        let st = self.state.read();
        self.derive_all(&st)
    }

    /// The derived upstreams that may have changed after registry index `since` (all of
    /// them when `since` is `None` or too old to tell), with the index of this view, all
    /// from one consistent state. The gateway's bridge passes the returned `index` as the
    /// next `since`, so each change is re-derived once and only for the names it touched.
    pub fn upstream_update(&self, since: Option<u64>) -> UpstreamUpdate {
        let st = self.state.read();
        let changed = since.and_then(|i| st.upstreams_changed_since(i));
        match changed {
            None => UpstreamUpdate {
                index: st.index,
                changed: None,
                upstreams: self.derive_all(&st),
            },
            Some(names) => {
                let mut upstreams = BTreeMap::new();
                for name in &names {
                    let instances = st.instances(name).map(|s| self.instance(&st, s));
                    let prefix = format!("{}{name}/", derive::KV_UPSTREAMS_PREFIX);
                    let kv = state::prefix_range(&st.kv, &prefix)
                        .map(|(k, e)| (k.as_str(), e.value.as_slice()));
                    let mut derived =
                        derive::derive_upstreams(instances, kv, &self.opts.node_address);
                    if let Some(servers) = derived.remove(*name) {
                        upstreams.insert(name.to_string(), servers);
                    }
                }
                UpstreamUpdate {
                    index: st.index,
                    changed: Some(names.into_iter().map(str::to_string).collect()),
                    upstreams,
                }
            }
        }
    }

    fn instance<'a>(&self, st: &'a State, s: &'a model::ServiceDef) -> derive::Instance<'a> {
        derive::Instance {
            id: &s.id,
            name: &s.name,
            address: &s.address,
            port: s.port,
            tags: &s.tags,
            weights: s.weights,
            health: st.service_health(&s.id),
        }
    }

    fn derive_all(&self, st: &State) -> BTreeMap<String, Vec<UpstreamServer>> {
        let instances = st.services.values().map(|s| self.instance(st, s));
        let kv = state::prefix_range(&st.kv, derive::KV_UPSTREAMS_PREFIX)
            .map(|(k, e)| (k.as_str(), e.value.as_slice()));
        derive::derive_upstreams(instances, kv, &self.opts.node_address)
    }

    /// Starts check runners, TTL timers and the reaper on the current tokio runtime.
    /// Idempotent. Outside a tokio runtime it logs an error and starts nothing.
    pub fn start(self: &Arc<Self>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            tracing::error!("Registry::start called outside a tokio runtime; checks not started");
            return;
        };
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        *self.runtime.lock() = Some(handle.clone());
        let defs: Vec<CheckDef> = self
            .state
            .read()
            .checks
            .values()
            .map(|c| c.def.clone())
            .collect();
        for def in &defs {
            self.restart_runner(def);
        }
        let reaper = handle.spawn(checks::reaper(Arc::downgrade(self)));
        self.background.lock().push(reaper.abort_handle());
    }

    /// Stops every background task started by [`Registry::start`] and wakes blocking
    /// queries (they answer at once).
    pub fn stop(&self) {
        self.shutdown_tx.send_replace(true);
        for (_, h) in self.runners.lock().drain() {
            h.abort();
        }
        for h in self.background.lock().drain(..) {
            h.abort();
        }
        *self.runtime.lock() = None;
        self.started.store(false, Ordering::SeqCst);
    }

    /// Serves the Consul HTTP API on `listener` until `shutdown` completes, then finishes
    /// in-flight requests (blocking queries answer at once). Starts background tasks.
    pub async fn serve(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.start();
        api::serve(self.clone(), listener, shutdown).await
    }

    // ---------------------------------------------------------------- writes

    /// Runs a durable write: `plan` sees the state and the index the write will get, and
    /// returns the ops; they are committed, then applied, then announced. Runs on a
    /// blocking thread and completes even if the caller goes away.
    pub(crate) async fn write<R, F>(self: &Arc<Self>, plan: F) -> Result<R, ApiError>
    where
        R: Send + 'static,
        F: FnOnce(&State, u64) -> Result<Planned<R>, ApiError> + Send + 'static,
    {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.write_blocking(plan))
            .await
            .unwrap_or_else(|e| Err(ApiError::internal(format!("write failed: {e}"))))
    }

    pub(crate) fn write_blocking<R, F>(&self, plan: F) -> Result<R, ApiError>
    where
        F: FnOnce(&State, u64) -> Result<Planned<R>, ApiError>,
    {
        let mut w = self.writer.lock();
        let planned = {
            let st = self.state.read();
            let next = st.index + 1;
            plan(&st, next)?
        };
        if planned.ops.is_empty() {
            return Ok(planned.result);
        }
        let next = self.state.read().index + 1;
        let carried = w.pending.len();
        let mut ops = w.pending.clone();
        ops.extend(planned.ops);
        let batch = Batch {
            index: next.max(w.reserved),
            ops,
        };
        self.store.commit(&batch).map_err(|e| match e {
            // Logged by the store (a WARN at the first refusal); nothing was applied.
            StoreError::Full(full) => ApiError::new(507, full.to_string()),
            e => {
                tracing::error!(error = %e, "registry commit failed");
                ApiError::internal(e.to_string())
            }
        })?;
        w.reserved = batch.index;
        w.pending.clear();
        let batch = Batch {
            index: batch.index,
            ops: batch.ops.into_iter().skip(carried).collect(),
        };
        let now = Instant::now();
        {
            let mut st = self.state.write();
            for op in &batch.ops {
                st.apply(op, next, now);
            }
            st.index = next;
        }
        for op in &batch.ops {
            match op {
                Op::PutCheck(def) => self.restart_runner(def),
                Op::DeleteCheck(id) => self.stop_runner(id),
                Op::DeleteService(_) => self.prune_runners(),
                _ => {}
            }
        }
        self.index_tx.send_replace(next);
        Ok(planned.result)
    }

    /// A volatile change to a check's live state (not persisted). `f` changes the entry
    /// and returns whether the change is visible (status or output), which bumps the index.
    pub(crate) fn update_check_blocking<F>(&self, check_id: &str, f: F) -> Result<(), ApiError>
    where
        F: FnOnce(
            &mut state::CheckEntry,
            Instant,
        ) -> Result<Option<(CheckStatus, String)>, ApiError>,
    {
        let mut w = self.writer.lock();
        let next = self.state.read().index + 1;
        if next > w.reserved {
            let batch = Batch {
                index: next + INDEX_RESERVE,
                ops: Vec::new(),
            };
            // Statuses are not stored: a failed reservation only means the index may go
            // back after a restart. A full disk is logged by the store.
            match self.store.commit(&batch) {
                Ok(()) => w.reserved = batch.index,
                Err(StoreError::Full(e)) => {
                    tracing::debug!(error = %e, "registry index reservation refused")
                }
                Err(e) => tracing::error!(error = %e, "registry index reservation failed"),
            }
        }
        let now = Instant::now();
        let changed = {
            let mut st = self.state.write();
            let Some(entry) = st.checks.get_mut(check_id) else {
                return Err(unknown_check(check_id));
            };
            match f(entry, now)? {
                Some((status, output)) => {
                    st.set_check_status(check_id, status, output, next, now);
                    st.index = next;
                    true
                }
                None => false,
            }
        };
        if changed {
            self.index_tx.send_replace(next);
        }
        Ok(())
    }

    pub(crate) async fn update_check<F>(
        self: &Arc<Self>,
        check_id: String,
        f: F,
    ) -> Result<(), ApiError>
    where
        F: FnOnce(
                &mut state::CheckEntry,
                Instant,
            ) -> Result<Option<(CheckStatus, String)>, ApiError>
            + Send
            + 'static,
    {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.update_check_blocking(&check_id, f))
            .await
            .unwrap_or_else(|e| Err(ApiError::internal(format!("update failed: {e}"))))
    }

    // ---------------------------------------------------------------- runners

    fn restart_runner(self: &Registry, def: &CheckDef) {
        let Some(handle) = self.runtime.lock().clone() else {
            return;
        };
        let me = self.weak_self.clone();
        let task = match &def.kind {
            CheckKind::Http { .. } | CheckKind::Tcp { .. } => handle.spawn(
                checks::run_interval_check(me, def.id.clone(), def.kind.clone()),
            ),
            CheckKind::Ttl { ttl } => handle.spawn(checks::run_ttl_timer(me, def.id.clone(), *ttl)),
            CheckKind::Maintenance => {
                self.stop_runner(&def.id);
                return;
            }
        };
        if let Some(old) = self
            .runners
            .lock()
            .insert(def.id.clone(), task.abort_handle())
        {
            old.abort();
        }
    }

    fn stop_runner(&self, id: &str) {
        if let Some(h) = self.runners.lock().remove(id) {
            h.abort();
        }
    }

    /// Stops runners whose check is gone (a deleted service takes its checks along).
    fn prune_runners(&self) {
        let st = self.state.read();
        self.runners.lock().retain(|id, h| {
            let keep = st.checks.contains_key(id);
            if !keep {
                h.abort();
            }
            keep
        });
    }
}

pub(crate) fn unknown_check(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "Unknown check ID {id:?}. Ensure that the check ID is passed, not the check name."
    ))
}

pub(crate) fn unknown_service(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."
    ))
}

/// A random (v4) UUID.
pub(crate) fn new_uuid() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // No entropy source: fall back to the clock (the node ID is not a secret).
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = t.to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Stored;

    /// A store whose commits fail as on a full disk while `full` is set.
    #[derive(Default)]
    struct FullDisk {
        full: Arc<AtomicBool>,
        batches: Arc<Mutex<Vec<Batch>>>,
    }

    impl RegistryStore for FullDisk {
        fn load(&self) -> Result<Stored, StoreError> {
            Ok(Stored::default())
        }
        fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
            if self.full.load(Ordering::SeqCst) {
                return Err(StoreError::Full(dynagate_store::DiskFull {
                    dir: "/data".into(),
                    file: "registry.db".into(),
                    cause: "database or disk is full".into(),
                }));
            }
            self.batches.lock().push(batch.clone());
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_full_disk_answers_507_and_changes_nothing_until_space_is_freed() {
        let store = FullDisk::default();
        store.full.store(true, Ordering::SeqCst);
        let (full, batches) = (store.full.clone(), store.batches.clone());
        // A first start on a full disk: the node ID waits for the first write.
        let registry = Registry::with_store(Box::new(store), RegistryOptions::default()).unwrap();
        let index = registry.index();
        let err = registry
            .kv_put("a".into(), b"1".to_vec(), 0, None)
            .await
            .unwrap_err();
        assert_eq!(err.status, 507);
        assert!(err.msg.contains("/data is full"), "{}", err.msg);
        assert_eq!(registry.index(), index, "nothing applied");
        assert!(registry.state.read().kv.is_empty());

        full.store(false, Ordering::SeqCst);
        assert!(registry
            .kv_put("a".into(), b"1".to_vec(), 0, None)
            .await
            .unwrap());
        assert_eq!(registry.index(), index + 1);
        assert_eq!(registry.state.read().kv["a"].value, b"1");
        let batches = batches.lock();
        assert_eq!(batches.len(), 1);
        assert_eq!(
            batches[0].ops[0],
            Op::SetMeta("node_id".into(), registry.node_id.clone()),
            "the node ID goes with the first write that gets through"
        );
        assert!(matches!(&batches[0].ops[1], Op::PutKv(e) if e.key == "a"));
    }
}
