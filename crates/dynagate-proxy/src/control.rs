//! The one door for state changes: a command is validated by the model, committed to the
//! store, and only then published to the data plane as a new snapshot. Commands are
//! serialized; the data plane never waits for them.

use crate::proxy::GlobalCounters;
use crate::routing::RouteTable;
use crate::runtime::{mono_ms, unix_ms, Snapshot, UpstreamRuntime};
use crate::stats::{CheckResult, LATENCY_BOUNDS_MS};
use arc_swap::ArcSwap;
use dynagate_model::{Change, Command, Config, ModelError, Revision, ServerState, Upstream};
use dynagate_store::{RevisionSummary, Store, StoreError};
use parking_lot::Mutex;
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ControlError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ControlError {
    /// The HTTP status an API should answer with: 507 Insufficient Storage when the
    /// data directory is full (nothing was applied; the next write tries again).
    pub fn status(&self) -> u16 {
        match self {
            ControlError::Model(e) => e.status(),
            ControlError::Store(StoreError::Full(_)) => 507,
            ControlError::Store(_) => 500,
        }
    }

    /// True when the command was refused for want of space (see [`ControlError::status`]).
    pub fn disk_full(&self) -> bool {
        matches!(self, ControlError::Store(StoreError::Full(_)))
    }
}

/// What an accepted command produced.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The revision now in force (unchanged when the command changed nothing).
    pub revision: u64,
    pub summary: String,
    /// False when the command asked for the state that was already in force.
    pub changed: bool,
    /// Where the time went (the admin API reports it as `Server-Timing`).
    #[serde(skip)]
    pub timing: Timing,
}

/// The phases of one change: validated against the model, made durable, published to
/// the data plane. `store` is mostly the disk's fsync; `model` + `publish` is what
/// applying the change costs the gateway.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    pub model: std::time::Duration,
    pub store: std::time::Duration,
    pub publish: std::time::Duration,
}

impl Timing {
    /// The `Server-Timing` header value (RFC: durations in milliseconds).
    pub fn header_value(&self) -> String {
        format!(
            "model;dur={:.3}, store;dur={:.3}, publish;dur={:.3}",
            self.model.as_secs_f64() * 1e3,
            self.store.as_secs_f64() * 1e3,
            self.publish.as_secs_f64() * 1e3
        )
    }
}

/// Live view of one server, for the admin API, the CLI and the dashboard.
#[derive(Debug, Clone, Serialize)]
pub struct ServerStatus {
    pub address: String,
    pub weight: u32,
    pub state: ServerState,
    pub backup: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub in_flight: u64,
    pub requests: u64,
    pub failures: u64,
    /// True while nginx-style passive health (max_fails/fail_timeout) skips the server.
    pub passive_unhealthy: bool,
    /// Active health: `healthy`, `unhealthy`, or `unchecked` (no check configured yet).
    pub health: &'static str,
    pub last_check: Option<CheckResult>,
    /// True while outlier detection keeps the server out.
    pub ejected: bool,
    pub ejections: u64,
    /// The weight after slow start.
    pub effective_weight: f64,
    /// Whether the balancer would give it a new request now.
    pub available: bool,
    /// Registry-fed servers: the registry's verdict (passing, warning, critical, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<&'static str>,
    /// Unix milliseconds of the last admin, health or ejection state change.
    pub last_state_change_ms: u64,
    pub responses: ResponseClasses,
    pub latency: Latency,
}

/// Responses by status class.
#[derive(Debug, Clone, Serialize)]
pub struct ResponseClasses {
    #[serde(rename = "1xx")]
    pub c1: u64,
    #[serde(rename = "2xx")]
    pub c2: u64,
    #[serde(rename = "3xx")]
    pub c3: u64,
    #[serde(rename = "4xx")]
    pub c4: u64,
    #[serde(rename = "5xx")]
    pub c5: u64,
}

/// Response-head latency histogram: `counts[i]` responses took at most `bounds_ms[i]`
/// (and more than the bound before); the last count is above every bound.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub bounds_ms: &'static [f64],
    pub counts: Vec<u64>,
    pub sum_ms: f64,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpstreamStatus {
    #[serde(flatten)]
    pub spec: Upstream,
    pub live: Vec<ServerStatus>,
}

struct Inner {
    config: Config,
    revision: u64,
}

/// Adds lines to the metrics text (the registry registers one).
pub type MetricsSource = Box<dyn Fn(&mut String) + Send + Sync>;

pub struct Controller {
    inner: Mutex<Inner>,
    store: Arc<dyn Store>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    /// The revision in force, for watchers (the health checker, later etcd).
    revision_tx: tokio::sync::watch::Sender<u64>,
    pub counters: Arc<GlobalCounters>,
    metrics_sources: Mutex<Vec<MetricsSource>>,
    started: std::time::Instant,
}

impl Controller {
    /// Loads the last committed state and builds the first snapshot from it, so the data
    /// plane serves that state from its first request.
    pub fn open(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let loaded = store.load()?;
        let snapshot = Snapshot::new(
            loaded.revision,
            Arc::new(RouteTable::build(loaded.config.routes.values())),
            loaded
                .config
                .upstreams
                .iter()
                .map(|(name, spec)| {
                    (
                        name.clone(),
                        Arc::new(UpstreamRuntime::build(spec.clone(), None)),
                    )
                })
                .collect(),
        );
        let (revision_tx, _) = tokio::sync::watch::channel(loaded.revision);
        Ok(Controller {
            inner: Mutex::new(Inner {
                config: loaded.config,
                revision: loaded.revision,
            }),
            store,
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            revision_tx,
            counters: Arc::default(),
            metrics_sources: Mutex::new(Vec::new()),
            started: std::time::Instant::now(),
        })
    }

    /// The handle every data-plane worker reads the current snapshot from.
    pub fn snapshots(&self) -> Arc<ArcSwap<Snapshot>> {
        self.snapshot.clone()
    }

    /// Notified with the new revision number after every published change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revision_tx.subscribe()
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    pub fn add_metrics_source(&self, source: MetricsSource) {
        self.metrics_sources.lock().push(source);
    }

    /// Appends the lines of every registered metrics source.
    pub fn render_extra_metrics(&self, out: &mut String) {
        for source in self.metrics_sources.lock().iter() {
            source(out);
        }
    }

    pub fn config(&self) -> Config {
        self.inner.lock().config.clone()
    }

    pub fn revision(&self) -> u64 {
        self.inner.lock().revision
    }

    /// Validates, commits and publishes one command. Nothing changes unless all succeed.
    pub fn execute(&self, command: Command) -> Result<Outcome, ControlError> {
        let mut inner = self.inner.lock();
        let started = std::time::Instant::now();
        let applied = inner.config.apply(command)?;
        let mut timing = Timing {
            model: started.elapsed(),
            ..Timing::default()
        };
        if applied.changes.is_empty() {
            return Ok(Outcome {
                revision: inner.revision,
                summary: format!("{} (no change)", applied.summary),
                changed: false,
                timing,
            });
        }
        let revision = Revision {
            number: inner.revision + 1,
            time_ms: unix_ms(),
            summary: applied.summary,
            changes: applied.changes,
        };
        let stored = std::time::Instant::now();
        self.store.commit(&revision)?;
        timing.store = stored.elapsed();
        let published = std::time::Instant::now();
        inner.config = applied.config;
        inner.revision = revision.number;
        self.publish(&inner.config, &revision);
        timing.publish = published.elapsed();
        Ok(Outcome {
            revision: revision.number,
            summary: revision.summary,
            changed: true,
            timing,
        })
    }

    /// Restores the whole routes + upstreams state of revision `number` as a new revision.
    pub fn rollback(&self, number: u64) -> Result<Outcome, ControlError> {
        let target = {
            let inner = self.inner.lock();
            if number > inner.revision {
                return Err(ModelError::NotFound(format!(
                    "revision {number} does not exist (latest is {})",
                    inner.revision
                ))
                .into());
            }
            let oldest = self.store.oldest_restorable()?;
            if number < oldest {
                return Err(ModelError::NotFound(format!(
                    "revision {number} is no longer retained (oldest restorable is {oldest})"
                ))
                .into());
            }
            let newer = self.store.revisions_after(number)?;
            inner.config.rewind(&newer, number)
        };
        // A change that slipped in between is undone too: Restore replaces the whole state.
        self.execute(Command::Restore {
            config: target,
            revision: number,
        })
    }

    pub fn revisions(&self, limit: usize) -> Result<Vec<RevisionSummary>, ControlError> {
        Ok(self.store.revisions(limit)?)
    }

    /// Applies the changes of a committed revision to the published snapshot. Only the
    /// upstreams the revision touched are rebuilt; the route table only if routes changed.
    fn publish(&self, config: &Config, revision: &Revision) {
        let old = self.snapshot.load_full();
        let mut next = (*old).clone();
        next.revision = revision.number;
        let mut routes_changed = false;
        for change in &revision.changes {
            match change {
                Change::Upstream { key, after, .. } => {
                    let runtime = after.as_ref().map(|spec| {
                        let previous = old.upstreams.get(key).map(|u| &**u);
                        Arc::new(UpstreamRuntime::build(spec.clone(), previous))
                    });
                    next.set_upstream(key, runtime);
                }
                Change::Route { .. } => routes_changed = true,
            }
        }
        if routes_changed {
            next.set_routes(Arc::new(RouteTable::build(config.routes.values())));
        }
        self.snapshot.store(Arc::new(next));
        self.revision_tx.send_replace(revision.number);
    }

    /// The configuration of an upstream with the live state of each of its servers.
    pub fn upstream_status(&self, name: &str) -> Option<UpstreamStatus> {
        let snapshot = self.snapshot.load();
        let up = snapshot.upstreams.get(name)?;
        let live = server_statuses(up);
        Some(UpstreamStatus {
            spec: (*up.spec).clone(),
            live,
        })
    }
}

/// The live status of every server of an upstream.
pub fn server_statuses(up: &UpstreamRuntime) -> Vec<ServerStatus> {
    let now = mono_ms();
    up.servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let st = &s.stats;
            let classes = st.class_totals();
            let counts = st.latency_counts();
            ServerStatus {
                address: s.spec.address.clone(),
                weight: s.spec.weight,
                state: s.spec.state,
                backup: s.spec.backup,
                zone: s.spec.zone.clone(),
                in_flight: st.in_flight(),
                requests: st.requests(),
                failures: st.failures.load(Ordering::Relaxed),
                passive_unhealthy: st.passive_skipped(now),
                health: st.health().as_str(),
                last_check: st.last_check(),
                ejected: st.ejected(now),
                ejections: st.ejections.load(Ordering::Relaxed),
                effective_weight: up.current_weight(i),
                available: up.available(i, now),
                registry: s.spec.registry.map(|r| r.as_str()),
                last_state_change_ms: st.last_state_change_ms.load(Ordering::Relaxed),
                responses: ResponseClasses {
                    c1: classes[0],
                    c2: classes[1],
                    c3: classes[2],
                    c4: classes[3],
                    c5: classes[4],
                },
                latency: Latency {
                    bounds_ms: &LATENCY_BOUNDS_MS,
                    count: counts.iter().sum(),
                    counts,
                    sum_ms: st.latency_sum_us() as f64 / 1000.0,
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynagate_model::Server;
    use dynagate_store::{DiskFull, Loaded};
    use std::sync::atomic::AtomicBool;

    /// A store whose commits fail as on a full disk while `full` is set.
    #[derive(Default)]
    struct FullDisk {
        full: AtomicBool,
        commits: Mutex<Vec<u64>>,
    }

    impl Store for FullDisk {
        fn load(&self) -> Result<Loaded, StoreError> {
            Ok(Loaded::default())
        }
        fn commit(&self, revision: &Revision) -> Result<(), StoreError> {
            if self.full.load(Ordering::SeqCst) {
                return Err(StoreError::Full(DiskFull {
                    dir: "/data".into(),
                    file: "dynagate.db".into(),
                    cause: "database or disk is full".into(),
                }));
            }
            self.commits.lock().push(revision.number);
            Ok(())
        }
        fn revisions(&self, _: usize) -> Result<Vec<RevisionSummary>, StoreError> {
            Ok(Vec::new())
        }
        fn revisions_after(&self, _: u64) -> Result<Vec<Revision>, StoreError> {
            Ok(Vec::new())
        }
        fn oldest_restorable(&self) -> Result<u64, StoreError> {
            Ok(0)
        }
    }

    fn put(name: &str, port: u16) -> Command {
        Command::PutUpstream {
            upstream: Box::new(Upstream::new(
                name,
                vec![Server::new(format!("127.0.0.1:{port}"))],
            )),
            force: false,
        }
    }

    #[test]
    fn a_commit_refused_for_want_of_space_changes_nothing_and_answers_507() {
        let store = Arc::new(FullDisk::default());
        let controller = Controller::open(store.clone()).unwrap();
        controller.execute(put("a", 9001)).unwrap();
        let snapshots = controller.snapshots();
        let published = snapshots.load_full();
        let config = controller.config();

        store.full.store(true, Ordering::SeqCst);
        let mut revisions = controller.subscribe();
        revisions.borrow_and_update();
        for command in [put("a", 9002), put("b", 9003)] {
            let err = controller.execute(command).unwrap_err();
            assert_eq!(err.status(), 507, "{err}");
            assert!(err.disk_full());
            assert!(err.to_string().contains("/data is full"), "{err}");
        }
        assert_eq!(controller.revision(), 1);
        assert_eq!(controller.config(), config, "the model is unchanged");
        assert!(
            Arc::ptr_eq(&snapshots.load_full(), &published),
            "the published snapshot is unchanged"
        );
        assert!(!revisions.has_changed().unwrap(), "no revision announced");

        // Space again: the next command goes through, as revision 2.
        store.full.store(false, Ordering::SeqCst);
        let outcome = controller.execute(put("b", 9003)).unwrap();
        assert_eq!(outcome.revision, 2);
        assert_eq!(*store.commits.lock(), vec![1, 2]);
        assert!(snapshots.load().upstreams.get("b").is_some());
    }
}
