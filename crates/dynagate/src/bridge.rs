//! Registered services become upstreams: after every registry change, each service's
//! instances (and each nginx-upsync KV upstream) are applied to the gateway as a
//! `SyncRegistry` command — validated, committed and published like any other change.
//! Deregistered instances leave the upstream (in-flight requests finish); instances
//! whose checks fail stay members that take no new requests, i.e. they drain.

use dynagate_model::{Command, ModelError, RegistryStatus, Server};
use dynagate_proxy::{ControlError, Controller};
use dynagate_registry::derive::UpstreamServer;
use dynagate_registry::model::Health;
use dynagate_registry::Registry;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

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
    loop {
        changes.borrow_and_update();
        revisions.borrow_and_update();
        let derived = registry.upstreams();
        let c = controller.clone();
        let result = tokio::task::spawn_blocking(move || sync(&c, derived)).await;
        match result {
            Ok(refused) => {
                for (name, why) in refused {
                    if conflicts.insert(name.clone()) {
                        tracing::warn!(upstream = %name, "registry service not applied: {why}");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "registry sync task failed"),
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            r = revisions.changed() => if r.is_err() { break },
            _ = stop.changed() => break,
        }
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

/// Applies every difference; returns the upstreams that were refused and why.
pub fn sync(
    controller: &Controller,
    derived: BTreeMap<String, Vec<UpstreamServer>>,
) -> Vec<(String, String)> {
    let config = controller.config();
    let apply = |name: &str, servers: Vec<Server>| -> Option<(String, String)> {
        let command = Command::SyncRegistry {
            upstream: name.to_string(),
            servers,
        };
        match controller.execute(command) {
            Ok(_) => None,
            Err(ControlError::Model(ModelError::Conflict(why))) => Some((name.to_string(), why)),
            Err(e) => Some((name.to_string(), e.to_string())),
        }
    };
    let mut refused = Vec::new();
    for (name, members) in &derived {
        if dynagate_model::validate::validate_name("name", name).is_err() {
            refused.push((
                name.clone(),
                "the service name is not a valid upstream name".into(),
            ));
            continue;
        }
        let servers = servers_of(members);
        let unchanged = config
            .upstreams
            .get(name)
            .is_some_and(|u| registry_view(&u.servers) == registry_view(&servers));
        if !unchanged {
            refused.extend(apply(name, servers));
        }
    }
    // Services that are gone entirely: their upstream keeps existing (routes may use
    // it) with no servers, so requests get 503 instead of reaching a stale address.
    for (name, up) in config.upstreams.iter() {
        if up.registry_fed && !up.servers.is_empty() && !derived.contains_key(name) {
            refused.extend(apply(name, Vec::new()));
        }
    }
    refused
}
