//! The whole routes + upstreams state, the commands that change it, and the record of
//! each change. `Config` is a persistent map pair: cloning is O(1) and changing one
//! upstream costs O(log n), so the cost of a change does not grow with the configuration.

use crate::error::ModelError;
use crate::types::{Route, Server, ServerPatch, ServerState, Upstream};
use crate::validate::{validate_name, validate_route, validate_server, validate_upstream};
use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    pub upstreams: OrdMap<String, Arc<Upstream>>,
    pub routes: OrdMap<String, Arc<Route>>,
}

/// A state change. Every writer (admin API, CLI, dyups API, registry bridge, rollback)
/// goes through `Config::apply` with one of these.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Create or replace an upstream. Emptying a non-empty upstream needs `force`.
    PutUpstream {
        upstream: Box<Upstream>,
        force: bool,
    },
    DeleteUpstream {
        name: String,
    },
    /// Replace the servers of an upstream, creating it with default settings if missing
    /// and keeping its other settings otherwise (the dyups `POST /upstream/{name}`).
    SetServers {
        upstream: String,
        servers: Vec<Server>,
    },
    /// The service registry's view of an upstream's members (each with its registry
    /// status). Creates the registry-fed upstream if missing; keeps every operator
    /// `state` override of members that stay.
    SyncRegistry {
        upstream: String,
        servers: Vec<Server>,
    },
    /// Several `SyncRegistry` in one revision (one commit): the registry bridge's pass
    /// after a burst of registrations. Refused as a whole if any one is refused.
    SyncRegistryBatch {
        upstreams: Vec<(String, Vec<Server>)>,
    },
    AddServer {
        upstream: String,
        server: Server,
    },
    UpdateServer {
        upstream: String,
        address: String,
        patch: ServerPatch,
    },
    /// Removing the last server needs `force`.
    RemoveServer {
        upstream: String,
        address: String,
        force: bool,
    },
    PutRoute {
        route: Route,
    },
    DeleteRoute {
        id: String,
    },
    /// Replace the whole state (rollback to `revision`).
    Restore {
        config: Config,
        revision: u64,
    },
}

/// One entity before and after a change; `None` means absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    Upstream {
        key: String,
        before: Option<Arc<Upstream>>,
        after: Option<Arc<Upstream>>,
    },
    Route {
        key: String,
        before: Option<Arc<Route>>,
        after: Option<Arc<Route>>,
    },
}

/// An accepted change: the next global revision number, when, what, and the entities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    pub number: u64,
    pub time_ms: u64,
    pub summary: String,
    pub changes: Vec<Change>,
}

/// The outcome of a command that was accepted by the model (not yet stored).
#[derive(Debug, Clone)]
pub struct Applied {
    pub config: Config,
    pub summary: String,
    pub changes: Vec<Change>,
}

impl Config {
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.get(name)
    }

    /// Routes that send traffic to `upstream`, by id.
    pub fn routes_using(&self, upstream: &str) -> Vec<String> {
        self.routes
            .values()
            .filter(|r| r.upstream == upstream)
            .map(|r| r.id.clone())
            .collect()
    }

    /// Validates `command` against this state and returns the new state with the
    /// changes it makes. `self` is never modified: a refused command changes nothing.
    pub fn apply(&self, command: Command) -> Result<Applied, ModelError> {
        let mut next = self.clone();
        let summary;
        // Keys the command touches; only these are compared, so the cost of a change
        // does not grow with the number of upstreams and routes.
        let mut touched_upstream: Option<String> = None;
        let mut touched_upstreams: Vec<String> = Vec::new();
        let mut touched_route: Option<String> = None;
        let mut whole = false;
        match command {
            Command::PutUpstream { upstream, force } => {
                let mut upstream = *upstream;
                if upstream.servers.iter().any(|s| s.registry.is_some()) {
                    return Err(ModelError::invalid(
                        "servers",
                        "`registry` is set by the service registry only",
                    ));
                }
                match self.upstreams.get(&upstream.name) {
                    Some(old) if old.registry_fed => {
                        // Settings may change; membership stays the registry's.
                        if !upstream.servers.is_empty() {
                            self.membership_writable(&upstream.name)?;
                        }
                        upstream.servers = old.servers.clone();
                        upstream.registry_fed = true;
                    }
                    _ if upstream.registry_fed => {
                        return Err(ModelError::invalid(
                            "registry_fed",
                            "set by the service registry only: register a service of this name",
                        ));
                    }
                    _ => {}
                }
                validate_upstream(&upstream)?;
                if let Some(old) = self.upstreams.get(&upstream.name) {
                    if !old.servers.is_empty() && upstream.servers.is_empty() && !force {
                        return Err(ModelError::Conflict(format!(
                            "upstream {:?} would lose all its servers; add ?force=true to empty it",
                            upstream.name
                        )));
                    }
                    summary = format!("replace upstream {}", upstream.name);
                } else {
                    summary = format!("create upstream {}", upstream.name);
                }
                touched_upstream = Some(upstream.name.clone());
                next.upstreams
                    .insert(upstream.name.clone(), Arc::new(upstream));
            }
            Command::DeleteUpstream { name } => {
                let old = self.existing_upstream(&name)?;
                if old.registry_fed && !old.servers.is_empty() {
                    self.membership_writable(&name)?;
                }
                let users = self.routes_using(&name);
                if !users.is_empty() {
                    return Err(ModelError::Conflict(format!(
                        "upstream {name:?} is used by routes: {}",
                        users.join(", ")
                    )));
                }
                next.upstreams.remove(&name);
                summary = format!("delete upstream {name}");
                touched_upstream = Some(name);
            }
            Command::SetServers { upstream, servers } => {
                self.membership_writable(&upstream)?;
                let up = match self.upstreams.get(&upstream) {
                    Some(old) => Upstream {
                        servers,
                        ..(**old).clone()
                    },
                    None => Upstream::new(upstream.clone(), servers),
                };
                validate_upstream(&up)?;
                if up.servers.is_empty() {
                    return Err(ModelError::invalid(
                        "servers",
                        "at least one server is needed",
                    ));
                }
                summary = format!("set {} servers of upstream {upstream}", up.servers.len());
                next.upstreams.insert(upstream.clone(), Arc::new(up));
                touched_upstream = Some(upstream);
            }
            Command::SyncRegistry { upstream, servers } => {
                let up = next.registry_synced(&upstream, servers)?;
                summary = format!(
                    "registry sync of {}: {} instance(s)",
                    upstream,
                    up.servers.len()
                );
                next.upstreams.insert(upstream.clone(), Arc::new(up));
                touched_upstream = Some(upstream);
            }
            Command::SyncRegistryBatch { upstreams } => {
                let mut names = Vec::with_capacity(upstreams.len());
                for (upstream, servers) in upstreams {
                    let up = next.registry_synced(&upstream, servers)?;
                    next.upstreams.insert(upstream.clone(), Arc::new(up));
                    names.push(upstream);
                }
                const LISTED: usize = 8;
                let mut listed = names
                    .iter()
                    .take(LISTED)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                if names.len() > LISTED {
                    listed.push_str(&format!(" and {} more", names.len() - LISTED));
                }
                summary = format!("registry sync of {} upstreams: {listed}", names.len());
                names.sort();
                names.dedup();
                touched_upstreams = names;
            }
            Command::AddServer { upstream, server } => {
                let old = self.existing_upstream(&upstream)?;
                self.membership_writable(&upstream)?;
                validate_server("server", &server)?;
                if server.registry.is_some() {
                    return Err(ModelError::invalid(
                        "registry",
                        "set by the service registry only",
                    ));
                }
                if old.server(&server.address).is_some() {
                    return Err(ModelError::Conflict(format!(
                        "upstream {upstream:?} already has server {:?}",
                        server.address
                    )));
                }
                if old.servers.len() >= crate::validate::MAX_SERVERS {
                    return Err(ModelError::invalid(
                        "servers",
                        "upstream has the maximum number of servers",
                    ));
                }
                summary = format!("add server {} to {upstream}", server.address);
                let mut up = (**old).clone();
                up.servers.push(server);
                next.upstreams.insert(upstream.clone(), Arc::new(up));
                touched_upstream = Some(upstream);
            }
            Command::UpdateServer {
                upstream,
                address,
                patch,
            } => {
                let old = self.existing_upstream(&upstream)?;
                if patch.is_empty() {
                    return Err(ModelError::invalid(
                        "body",
                        "set at least one of weight, state, backup, zone",
                    ));
                }
                if old.registry_fed && (patch.weight.is_some() || patch.backup.is_some()) {
                    return Err(ModelError::Conflict(format!(
                        "weight and backup of upstream {upstream:?} come from the service registry; \
                         only state may be overridden"
                    )));
                }
                let mut up = (**old).clone();
                let server = up
                    .servers
                    .iter_mut()
                    .find(|s| s.address == address)
                    .ok_or_else(|| server_not_found(&upstream, &address))?;
                if let Some(w) = patch.weight {
                    crate::validate::validate_weight("weight", w)?;
                    server.weight = w;
                }
                if let Some(s) = patch.state {
                    server.state = s;
                }
                if let Some(b) = patch.backup {
                    server.backup = b;
                }
                if let Some(z) = &patch.zone {
                    crate::validate::validate_zone("zone", z)?;
                    server.zone = if z.is_empty() { None } else { Some(z.clone()) };
                }
                summary = format!(
                    "update server {address} of {upstream}: {}",
                    describe_patch(&patch)
                );
                next.upstreams.insert(upstream.clone(), Arc::new(up));
                touched_upstream = Some(upstream);
            }
            Command::RemoveServer {
                upstream,
                address,
                force,
            } => {
                let old = self.existing_upstream(&upstream)?;
                self.membership_writable(&upstream)?;
                if old.server(&address).is_none() {
                    return Err(server_not_found(&upstream, &address));
                }
                if old.servers.len() == 1 && !force {
                    return Err(ModelError::Conflict(format!(
                        "{address:?} is the last server of upstream {upstream:?}; add ?force=true to remove it"
                    )));
                }
                let mut up = (**old).clone();
                up.servers.retain(|s| s.address != address);
                summary = format!("remove server {address} from {upstream}");
                next.upstreams.insert(upstream.clone(), Arc::new(up));
                touched_upstream = Some(upstream);
            }
            Command::PutRoute { route } => {
                validate_route(&route)?;
                if !self.upstreams.contains_key(&route.upstream) {
                    return Err(ModelError::invalid(
                        "upstream",
                        format!("upstream {:?} does not exist", route.upstream),
                    ));
                }
                if let Some(other) = self.route_with_same_match(&route) {
                    return Err(ModelError::Conflict(format!(
                        "route {other:?} already matches the same hosts, path_prefix and methods"
                    )));
                }
                summary = match self.routes.get(&route.id) {
                    Some(old) if old.upstream != route.upstream => format!(
                        "route {}: switch upstream {} -> {}",
                        route.id, old.upstream, route.upstream
                    ),
                    Some(_) => format!("replace route {}", route.id),
                    None => format!("create route {} -> {}", route.id, route.upstream),
                };
                touched_route = Some(route.id.clone());
                next.routes.insert(route.id.clone(), Arc::new(route));
            }
            Command::DeleteRoute { id } => {
                validate_name("id", &id)?;
                if next.routes.remove(&id).is_none() {
                    return Err(ModelError::NotFound(format!("route {id:?} does not exist")));
                }
                summary = format!("delete route {id}");
                touched_route = Some(id);
            }
            Command::Restore { config, revision } => {
                for route in config.routes.values() {
                    if !config.upstreams.contains_key(&route.upstream) {
                        return Err(ModelError::Conflict(format!(
                            "revision {revision} is inconsistent: route {:?} uses missing upstream {:?}",
                            route.id, route.upstream
                        )));
                    }
                }
                next = config;
                summary = format!("rollback to revision {revision}");
                whole = true;
            }
        }
        let changes = if whole {
            diff(self, &next)
        } else {
            let mut changes = Vec::new();
            for key in touched_upstream.into_iter().chain(touched_upstreams) {
                let before = self.upstreams.get(&key).cloned();
                let after = next.upstreams.get(&key).cloned();
                if before != after {
                    changes.push(Change::Upstream { key, before, after });
                }
            }
            if let Some(key) = touched_route {
                let before = self.routes.get(&key).cloned();
                let after = next.routes.get(&key).cloned();
                if before != after {
                    changes.push(Change::Route { key, before, after });
                }
            }
            changes
        };
        Ok(Applied {
            config: next,
            summary,
            changes,
        })
    }

    /// Upstream `upstream` with the registry's view of its members (creating it, registry
    /// fed, if missing), keeping every operator `state` override of members that stay.
    fn registry_synced(
        &self,
        upstream: &str,
        servers: Vec<Server>,
    ) -> Result<Upstream, ModelError> {
        let mut up = match self.upstreams.get(upstream) {
            Some(old) if !old.registry_fed => {
                return Err(ModelError::Conflict(format!(
                    "upstream {upstream:?} is managed through the admin API; the registry service of that name is not applied"
                )));
            }
            Some(old) => (**old).clone(),
            None => Upstream {
                registry_fed: true,
                ..Upstream::new(upstream.to_string(), Vec::new())
            },
        };
        let overrides: std::collections::HashMap<&str, ServerState> = up
            .servers
            .iter()
            .map(|s| (s.address.as_str(), s.state))
            .collect();
        let servers: Vec<Server> = servers
            .into_iter()
            .map(|mut s| {
                s.state = overrides
                    .get(s.address.as_str())
                    .copied()
                    .unwrap_or(ServerState::Up);
                s
            })
            .collect();
        up.servers = servers;
        validate_upstream(&up)?;
        Ok(up)
    }

    /// Refuses membership changes of registry-fed upstreams.
    fn membership_writable(&self, name: &str) -> Result<(), ModelError> {
        if self.upstreams.get(name).is_some_and(|u| u.registry_fed) {
            return Err(ModelError::Conflict(format!(
                "the servers of upstream {name:?} come from the service registry; register or \
                 deregister service instances instead (server state overrides are allowed)"
            )));
        }
        Ok(())
    }

    fn existing_upstream(&self, name: &str) -> Result<&Arc<Upstream>, ModelError> {
        self.upstreams
            .get(name)
            .ok_or_else(|| ModelError::NotFound(format!("upstream {name:?} does not exist")))
    }

    fn route_with_same_match(&self, route: &Route) -> Option<String> {
        let key = |r: &Route| {
            let mut hosts = r.hosts.clone();
            hosts.sort();
            let mut methods = r.methods.clone();
            methods.sort();
            (hosts, r.path_prefix.clone(), methods)
        };
        let mine = key(route);
        self.routes
            .values()
            .find(|r| r.id != route.id && key(r) == mine)
            .map(|r| r.id.clone())
    }

    /// Applies the entity changes of one revision, forwards (`after`) or backwards (`before`).
    pub fn replay(&mut self, changes: &[Change], forwards: bool) {
        for change in changes {
            match change {
                Change::Upstream { key, before, after } => {
                    match if forwards { after } else { before } {
                        Some(v) => self.upstreams.insert(key.clone(), v.clone()),
                        None => self.upstreams.remove(key),
                    };
                }
                Change::Route { key, before, after } => {
                    match if forwards { after } else { before } {
                        Some(v) => self.routes.insert(key.clone(), v.clone()),
                        None => self.routes.remove(key),
                    };
                }
            }
        }
    }

    /// The state as it was at the end of revision `target`, given this (current) state
    /// and every revision after `target`, newest first.
    pub fn rewind(&self, newer_first: &[Revision], target: u64) -> Config {
        let mut config = self.clone();
        for rev in newer_first.iter().filter(|r| r.number > target) {
            let mut changes = rev.changes.clone();
            changes.reverse();
            config.replay(&changes, false);
        }
        config
    }
}

fn server_not_found(upstream: &str, address: &str) -> ModelError {
    ModelError::NotFound(format!("upstream {upstream:?} has no server {address:?}"))
}

fn describe_patch(p: &ServerPatch) -> String {
    let mut parts = Vec::new();
    if let Some(w) = p.weight {
        parts.push(format!("weight={w}"));
    }
    if let Some(s) = p.state {
        parts.push(format!("state={}", s.as_str()));
    }
    if let Some(b) = p.backup {
        parts.push(format!("backup={b}"));
    }
    if let Some(z) = &p.zone {
        parts.push(format!("zone={z}"));
    }
    parts.join(" ")
}

/// The entities that differ between two states. Unchanged entities share their `Arc`,
/// so the comparison is a pointer check for everything a command did not touch.
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    let mut changes = Vec::new();
    for item in old.upstreams.diff(&new.upstreams) {
        let (key, before, after) = match item {
            imbl::ordmap::DiffItem::Add(k, v) => (k, None, Some(v.clone())),
            imbl::ordmap::DiffItem::Remove(k, v) => (k, Some(v.clone()), None),
            imbl::ordmap::DiffItem::Update { old, new } => {
                if Arc::ptr_eq(old.1, new.1) || old.1 == new.1 {
                    continue;
                }
                (old.0, Some(old.1.clone()), Some(new.1.clone()))
            }
        };
        changes.push(Change::Upstream {
            key: key.clone(),
            before,
            after,
        });
    }
    for item in old.routes.diff(&new.routes) {
        let (key, before, after) = match item {
            imbl::ordmap::DiffItem::Add(k, v) => (k, None, Some(v.clone())),
            imbl::ordmap::DiffItem::Remove(k, v) => (k, Some(v.clone()), None),
            imbl::ordmap::DiffItem::Update { old, new } => {
                if Arc::ptr_eq(old.1, new.1) || old.1 == new.1 {
                    continue;
                }
                (old.0, Some(old.1.clone()), Some(new.1.clone()))
            }
        };
        changes.push(Change::Route {
            key: key.clone(),
            before,
            after,
        });
    }
    changes
}

impl Change {
    pub fn upstream_key(&self) -> Option<&str> {
        match self {
            Change::Upstream { key, .. } => Some(key),
            Change::Route { .. } => None,
        }
    }
}

/// Marks whether a server's state in `after` differs from `before` (for state-change times).
pub fn server_state_changed(before: Option<&Upstream>, after: &Upstream, address: &str) -> bool {
    let old: Option<ServerState> = before.and_then(|u| u.server(address)).map(|s| s.state);
    let new = after.server(address).map(|s| s.state);
    old != new
}
