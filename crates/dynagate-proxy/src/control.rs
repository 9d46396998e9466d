//! The one door for state changes: a command is validated by the model, committed to the
//! store, and only then published to the data plane as a new snapshot. Commands are
//! serialized; the data plane never waits for them.

use crate::routing::RouteTable;
use crate::runtime::{mono_ms, unix_ms, Snapshot, UpstreamRuntime};
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
    /// The HTTP status an API should answer with.
    pub fn status(&self) -> u16 {
        match self {
            ControlError::Model(e) => e.status(),
            ControlError::Store(_) => 500,
        }
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
}

/// Live view of one server, for the admin API, the CLI and the dashboard.
#[derive(Debug, Clone, Serialize)]
pub struct ServerStatus {
    pub address: String,
    pub weight: u32,
    pub state: ServerState,
    pub backup: bool,
    pub in_flight: u64,
    pub requests: u64,
    pub failures: u64,
    /// True while passive health skips the server.
    pub passive_unhealthy: bool,
    /// Unix milliseconds of the last admin or health state change.
    pub last_state_change_ms: u64,
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

pub struct Controller {
    inner: Mutex<Inner>,
    store: Arc<dyn Store>,
    snapshot: Arc<ArcSwap<Snapshot>>,
}

impl Controller {
    /// Loads the last committed state and builds the first snapshot from it, so the data
    /// plane serves that state from its first request.
    pub fn open(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let loaded = store.load()?;
        let snapshot = Snapshot {
            revision: loaded.revision,
            routes: Arc::new(RouteTable::build(loaded.config.routes.values())),
            upstreams: loaded
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
        };
        Ok(Controller {
            inner: Mutex::new(Inner {
                config: loaded.config,
                revision: loaded.revision,
            }),
            store,
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
        })
    }

    /// The handle every data-plane worker reads the current snapshot from.
    pub fn snapshots(&self) -> Arc<ArcSwap<Snapshot>> {
        self.snapshot.clone()
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
        let applied = inner.config.apply(command)?;
        if applied.changes.is_empty() {
            return Ok(Outcome {
                revision: inner.revision,
                summary: format!("{} (no change)", applied.summary),
                changed: false,
            });
        }
        let revision = Revision {
            number: inner.revision + 1,
            time_ms: unix_ms(),
            summary: applied.summary,
            changes: applied.changes,
        };
        self.store.commit(&revision)?;
        inner.config = applied.config;
        inner.revision = revision.number;
        self.publish(&inner.config, &revision);
        Ok(Outcome {
            revision: revision.number,
            summary: revision.summary,
            changed: true,
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
        let mut next = Snapshot {
            revision: revision.number,
            routes: old.routes.clone(),
            upstreams: old.upstreams.clone(),
        };
        let mut routes_changed = false;
        for change in &revision.changes {
            match change {
                Change::Upstream { key, after, .. } => match after {
                    Some(spec) => {
                        let previous = old.upstreams.get(key).map(|u| &**u);
                        next.upstreams.insert(
                            key.clone(),
                            Arc::new(UpstreamRuntime::build(spec.clone(), previous)),
                        );
                    }
                    None => {
                        next.upstreams.remove(key);
                    }
                },
                Change::Route { .. } => routes_changed = true,
            }
        }
        if routes_changed {
            next.routes = Arc::new(RouteTable::build(config.routes.values()));
        }
        self.snapshot.store(Arc::new(next));
    }

    /// The configuration of an upstream with the live state of each of its servers.
    pub fn upstream_status(&self, name: &str) -> Option<UpstreamStatus> {
        let snapshot = self.snapshot.load();
        let up = snapshot.upstreams.get(name)?;
        let now = mono_ms();
        let live = up
            .servers
            .iter()
            .map(|s| ServerStatus {
                address: s.spec.address.clone(),
                weight: s.spec.weight,
                state: s.spec.state,
                backup: s.spec.backup,
                in_flight: s.stats.in_flight.load(Ordering::Relaxed),
                requests: s.stats.requests.load(Ordering::Relaxed),
                failures: s.stats.failures.load(Ordering::Relaxed),
                passive_unhealthy: s.stats.passive_skipped(now),
                last_state_change_ms: s.stats.last_state_change_ms.load(Ordering::Relaxed),
            })
            .collect();
        Some(UpstreamStatus {
            spec: (*up.spec).clone(),
            live,
        })
    }
}
