//! Registered services become upstreams: after every registry change, each changed
//! service's instances (and each changed nginx-upsync KV upstream) are applied to the
//! gateway as a `SyncRegistry` command — validated, committed and published like any
//! other change; the upstreams of one pass go in one revision (`SyncRegistryBatch`, one
//! commit) when there are several. Deregistered instances leave the upstream (in-flight requests finish);
//! instances whose checks fail stay members that take no new requests, i.e. they drain.
//!
//! Incremental: the registry logs which upstream names each change touched, so a pass
//! re-derives and compares only those ([`Registry::upstream_update`]). A full pass (every
//! derived upstream compared with the gateway's) runs at start, when the registry cannot
//! tell (a node check changed, or the bridge fell too far behind), and after any gateway
//! revision the bridge did not make itself — a rollback or restore may bring back a
//! membership the registry no longer has, and an admin change may free or take a name.

use dynagate_model::{Command, ModelError, RegistryStatus, Server};
use dynagate_proxy::{ControlError, Controller};
use dynagate_registry::derive::UpstreamServer;
use dynagate_registry::model::Health;
use dynagate_registry::{Registry, UpstreamUpdate};
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

/// How long the bridge waits before trying failed upstreams again when nothing changes.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Follows the registry until `stop` fires.
pub async fn run(
    registry: Arc<Registry>,
    controller: Arc<Controller>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut changes = registry.subscribe();
    // Revisions too: a rollback or an admin change may bring back a membership the
    // registry no longer has; the next pass puts the registry's back.
    let mut revisions = controller.subscribe();
    let mut conflicts: HashSet<String> = HashSet::new();
    let mut bridge = Bridge::default();
    loop {
        changes.borrow_and_update();
        revisions.borrow_and_update();
        let (r, c) = (registry.clone(), controller.clone());
        let result = tokio::task::spawn_blocking(move || {
            let refused = bridge.pass(&r, &c);
            (bridge, refused)
        })
        .await;
        match result {
            Ok((b, refused)) => {
                bridge = b;
                for (name, why) in refused {
                    if conflicts.insert(name.clone()) {
                        tracing::warn!(upstream = %name, "registry service not applied: {why}");
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "registry sync task failed");
                bridge = Bridge::default();
            }
        }
        // A command that failed (not a conflict: a full disk, say) is tried again on the
        // next change, or after a while if none comes, so that the gateway catches up by
        // itself once the cause is gone.
        let retry = async {
            match bridge.retry.is_empty() {
                true => std::future::pending().await,
                false => tokio::time::sleep(RETRY_AFTER).await,
            }
        };
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            r = revisions.changed() => if r.is_err() { break },
            _ = retry => {}
            _ = stop.changed() => break,
        }
    }
}

/// What the bridge remembers between passes.
#[derive(Debug, Default)]
pub struct Bridge {
    /// Registry index the gateway was last brought up to date with (`None`: never).
    synced_index: Option<u64>,
    /// Gateway revision after the last pass, when every revision up to it is accounted
    /// for (`None`: some other writer changed the gateway meanwhile).
    expected_revision: Option<u64>,
    /// Names whose command failed for a reason other than a conflict: tried again.
    retry: BTreeSet<String>,
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Whether every derived upstream was compared (else only the changed names).
    pub full: bool,
    /// Upstreams a `SyncRegistry` (or `SyncRegistryBatch`) command changed.
    pub applied: Vec<String>,
}

impl Bridge {
    /// Brings the gateway up to date with the registry; returns the upstreams that were
    /// refused and why.
    pub fn pass(&mut self, registry: &Registry, controller: &Controller) -> Vec<(String, String)> {
        self.pass_report(registry, controller).1
    }

    pub fn pass_report(
        &mut self,
        registry: &Registry,
        controller: &Controller,
    ) -> (PassReport, Vec<(String, String)>) {
        let revision = controller.revision();
        // Full unless nothing but the registry changed since the last pass, and that
        // pass had no failure to try again.
        let since = match self.expected_revision {
            Some(r) if r == revision && self.retry.is_empty() => self.synced_index,
            _ => None,
        };
        let update = registry.upstream_update(since);
        let outcome = sync(controller, &update);
        // Our own revisions are accounted for; any other one in between calls for a full
        // pass next time.
        let after = controller.revision();
        self.expected_revision = (after == revision + outcome.revisions).then_some(after);
        self.synced_index = Some(update.index);
        self.retry = outcome.failed;
        (
            PassReport {
                full: update.changed.is_none(),
                applied: outcome.applied,
            },
            outcome.refused,
        )
    }
}

/// The servers an upstream gets from the registry's view of it.
pub fn servers_of(members: &[UpstreamServer]) -> Vec<Server> {
    let mut seen = HashSet::new();
    members
        .iter()
        .filter(|m| {
            let valid = dynagate_model::validate::validate_address("address", &m.address).is_ok();
            if !valid {
                tracing::debug!(address = %m.address, "registry instance with an unusable address skipped");
            }
            valid && seen.insert(m.address.clone())
        })
        .map(|m| {
            let status = match m.status {
                Health::Critical => RegistryStatus::Critical,
                Health::Maintenance => RegistryStatus::Maintenance,
                _ if m.down || m.weight == 0 => RegistryStatus::Down,
                Health::Warning => RegistryStatus::Warning,
                Health::Passing => RegistryStatus::Passing,
            };
            Server {
                weight: m.weight.clamp(1, dynagate_model::validate::MAX_WEIGHT),
                backup: m.backup,
                registry: Some(status),
                ..Server::new(m.address.clone())
            }
        })
        .collect()
}

/// Everything about a member the registry decides (the operator's `state` is not).
fn registry_view(servers: &[Server]) -> Vec<(&str, u32, bool, Option<RegistryStatus>)> {
    servers
        .iter()
        .map(|s| (s.address.as_str(), s.weight, s.backup, s.registry))
        .collect()
}

#[derive(Debug, Default)]
struct SyncOutcome {
    refused: Vec<(String, String)>,
    /// Upstreams changed.
    applied: Vec<String>,
    /// Gateway revisions made.
    revisions: u64,
    /// Names to try again next pass.
    failed: BTreeSet<String>,
}

impl SyncOutcome {
    fn apply(&mut self, controller: &Controller, name: String, servers: Vec<Server>) {
        let command = Command::SyncRegistry {
            upstream: name.clone(),
            servers,
        };
        match controller.execute(command) {
            Ok(o) => {
                if o.changed {
                    self.revisions += 1;
                    self.applied.push(name);
                }
            }
            Err(ControlError::Model(ModelError::Conflict(why))) => self.refused.push((name, why)),
            Err(e) => {
                self.failed.insert(name.clone());
                self.refused.push((name, e.to_string()));
            }
        }
    }

    /// Applies all of them in one revision (one commit) when there are several; if that is
    /// refused, one by one, so that one refused upstream does not hold up the others.
    fn apply_all(&mut self, controller: &Controller, mut todo: Vec<(String, Vec<Server>)>) {
        if todo.len() > 1 {
            let names: Vec<String> = todo.iter().map(|(n, _)| n.clone()).collect();
            let command = Command::SyncRegistryBatch {
                upstreams: todo.clone(),
            };
            if let Ok(o) = controller.execute(command) {
                if o.changed {
                    self.revisions += 1;
                    self.applied.extend(names);
                }
                return;
            }
        }
        for (name, servers) in todo.drain(..) {
            self.apply(controller, name, servers);
        }
    }
}

/// Applies every difference between `update` and the gateway: all derived upstreams
/// when the update is full, else only the changed names.
fn sync(controller: &Controller, update: &UpstreamUpdate) -> SyncOutcome {
    let config = controller.config();
    let mut out = SyncOutcome::default();
    let mut todo: Vec<(String, Vec<Server>)> = Vec::new();
    // What one upstream needs to match the registry (`None`: nothing of it is left).
    let mut one = |name: &str, members: Option<&Vec<UpstreamServer>>| {
        let current = config.upstreams.get(name);
        match members {
            Some(members) => {
                if dynagate_model::validate::validate_name("name", name).is_err() {
                    out.refused.push((
                        name.to_string(),
                        "the service name is not a valid upstream name".into(),
                    ));
                    return;
                }
                let servers = servers_of(members);
                let unchanged =
                    current.is_some_and(|u| registry_view(&u.servers) == registry_view(&servers));
                if !unchanged {
                    todo.push((name.to_string(), servers));
                }
            }
            // A service that is gone entirely: its upstream keeps existing (routes may
            // use it) with no servers, so requests get 503 instead of reaching a stale
            // address.
            None => {
                if current.is_some_and(|u| u.registry_fed && !u.servers.is_empty()) {
                    todo.push((name.to_string(), Vec::new()));
                }
            }
        }
    };
    match &update.changed {
        None => {
            for (name, members) in &update.upstreams {
                one(name, Some(members));
            }
            for (name, up) in config.upstreams.iter() {
                if up.registry_fed && !update.upstreams.contains_key(name) {
                    one(name, None);
                }
            }
        }
        Some(changed) => {
            for name in changed {
                one(name, update.upstreams.get(name));
            }
        }
    }
    out.apply_all(controller, todo);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynagate_model::{ServerPatch, ServerState};
    use std::path::PathBuf;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).unwrap();
            let name: String = b.iter().map(|x| format!("{x:02x}")).collect();
            let p = std::env::temp_dir().join(format!("dynagate-bridge-{name}"));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A registry served on a loopback port, and a gateway controller, both on disk.
    struct Setup {
        registry: Arc<Registry>,
        controller: Controller,
        addr: std::net::SocketAddr,
        _dir: TempDir,
    }

    impl Setup {
        async fn new() -> Setup {
            let dir = TempDir::new();
            let registry = Registry::open(&dir.0, Default::default()).unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let r = registry.clone();
            tokio::spawn(async move { r.serve(listener, std::future::pending()).await });
            let store =
                dynagate_store::SqliteStore::open(&dir.0.join("dynagate.db"), 1000).unwrap();
            let controller = Controller::open(Arc::new(store)).unwrap();
            Setup {
                registry,
                controller,
                addr,
                _dir: dir,
            }
        }

        /// A Consul API write; panics unless it answers 200.
        async fn put(&self, path: &str, body: &str) {
            let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
            let req = format!(
                "PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            assert!(out.starts_with("HTTP/1.1 200"), "{path}: {out}");
        }

        async fn register(&self, name: &str, id: &str, port: u16) {
            let body = format!(
                r#"{{"Name":"{name}","ID":"{id}","Address":"127.0.0.1","Port":{port},"Check":{{"TTL":"1h","Status":"passing"}}}}"#
            );
            self.put("/v1/agent/service/register", &body).await;
        }

        fn pass(&self, bridge: &mut Bridge) -> PassReport {
            let (report, refused) = bridge.pass_report(&self.registry, &self.controller);
            assert!(refused.is_empty(), "{refused:?}");
            report
        }

        fn servers(&self, name: &str) -> Vec<String> {
            self.controller.config().upstreams[name]
                .servers
                .iter()
                .map(|s| s.address.clone())
                .collect()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_to_one_service_syncs_only_that_upstream() {
        let t = Setup::new().await;
        t.register("a", "a1", 1001).await;
        t.register("b", "b1", 2001).await;
        let mut bridge = Bridge::default();
        let before = t.controller.revision();
        let first = t.pass(&mut bridge);
        assert!(first.full, "the first pass looks at everything");
        assert_eq!(first.applied, ["a", "b"]);
        assert_eq!(t.controller.revision(), before + 1, "one revision for both");

        t.register("a", "a2", 1002).await;
        let r = t.pass(&mut bridge);
        assert_eq!(
            r,
            PassReport {
                full: false,
                applied: vec!["a".into()]
            }
        );
        assert_eq!(t.servers("a"), ["127.0.0.1:1001", "127.0.0.1:1002"]);
        // Its own revision does not call for another look.
        assert_eq!(t.pass(&mut bridge), PassReport::default());

        // A check of b fails: b only, and the server drains.
        t.put("/v1/agent/check/fail/service:b1", "").await;
        let r = t.pass(&mut bridge);
        assert_eq!((r.full, r.applied), (false, vec!["b".to_string()]));
        assert_eq!(
            t.controller.config().upstreams["b"].servers[0].registry,
            Some(RegistryStatus::Critical)
        );

        // nginx-upsync KV layout: upstream by key.
        t.put("/v1/kv/upstreams/legacy/10.0.0.1:80", "").await;
        let r = t.pass(&mut bridge);
        assert_eq!((r.full, r.applied), (false, vec!["legacy".to_string()]));

        // Deregistering the last instance empties the upstream (503), it stays.
        t.put("/v1/agent/service/deregister/b1", "").await;
        let r = t.pass(&mut bridge);
        assert_eq!((r.full, r.applied), (false, vec!["b".to_string()]));
        assert!(t.servers("b").is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn other_gateway_revisions_bring_a_full_resync() {
        let t = Setup::new().await;
        t.register("a", "a1", 1001).await;
        t.register("b", "b1", 2001).await;
        let mut bridge = Bridge::default();
        t.pass(&mut bridge);
        let one_instance = t.controller.revision();
        t.register("a", "a2", 1002).await;
        t.pass(&mut bridge);

        // An operator drains a member: a full pass follows, and changes nothing (the
        // override is the operator's, membership is unchanged).
        t.controller
            .execute(Command::UpdateServer {
                upstream: "a".into(),
                address: "127.0.0.1:1002".into(),
                patch: ServerPatch {
                    state: Some(ServerState::Drain),
                    ..Default::default()
                },
            })
            .unwrap();
        let r = t.pass(&mut bridge);
        assert_eq!((r.full, r.applied.len()), (true, 0));

        // A rollback to when a had one instance: the full pass puts the registry's
        // membership back.
        t.controller.rollback(one_instance).unwrap();
        assert_eq!(t.servers("a"), ["127.0.0.1:1001"]);
        let r = t.pass(&mut bridge);
        assert_eq!((r.full, r.applied), (true, vec!["a".to_string()]));
        assert_eq!(t.servers("a"), ["127.0.0.1:1001", "127.0.0.1:1002"]);
        // Back to incremental afterwards.
        t.register("b", "b2", 2002).await;
        let r = t.pass(&mut bridge);
        assert_eq!((r.full, r.applied), (false, vec!["b".to_string()]));

        // A service named like an upstream made through the admin API is not applied;
        // once the operator deletes that upstream, the next (full) pass creates it.
        t.controller
            .execute(Command::SetServers {
                upstream: "c".into(),
                servers: vec![Server::new("127.0.0.1:9")],
            })
            .unwrap();
        t.pass(&mut bridge);
        t.register("c", "c1", 3001).await;
        let (r, refused) = bridge.pass_report(&t.registry, &t.controller);
        assert_eq!((r.full, r.applied.len()), (false, 0));
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(t.servers("c"), ["127.0.0.1:9"]);
        t.controller
            .execute(Command::DeleteUpstream { name: "c".into() })
            .unwrap();
        let r = t.pass(&mut bridge);
        assert_eq!((r.full, r.applied), (true, vec!["c".to_string()]));
        assert_eq!(t.servers("c"), ["127.0.0.1:3001"]);
    }
}
