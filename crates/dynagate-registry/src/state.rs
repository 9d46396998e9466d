//! The in-memory registry: what every read is answered from. Changed only by applying
//! committed [`Op`]s (durable) or by check status updates (volatile), each at a new global
//! index. Also keeps the per-resource indexes blocking queries compare against.

use crate::model::{aggregate, CheckDef, CheckStatus, Health, KvEntry, ServiceDef};
use crate::store::Op;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Notify;

/// Tombstones kept for deleted KV keys before the oldest are folded into a floor.
const MAX_TOMBSTONES: usize = 65_536;

/// Entries kept in the log of changed upstream names; a reader further behind gets
/// "everything may have changed".
const MAX_UPSTREAM_LOG: usize = 65_536;

/// A check's live status. Not persisted: after a restart checks start at their initial
/// status again.
#[derive(Debug)]
pub struct CheckRuntime {
    pub status: CheckStatus,
    pub output: String,
    /// Index of the last change to the definition or the status.
    pub modify_index: u64,
    pub critical_since: Option<Instant>,
    /// TTL checks: when the check expires unless updated.
    pub ttl_deadline: Option<Instant>,
    /// Wakes the TTL timer when a deadline is set again after expiry.
    pub ttl_wake: Arc<Notify>,
}

#[derive(Debug)]
pub struct CheckEntry {
    pub def: CheckDef,
    pub rt: CheckRuntime,
}

impl CheckEntry {
    pub fn new(def: CheckDef, now: Instant) -> Self {
        let status = def.initial_status;
        let ttl_deadline = match &def.kind {
            crate::model::CheckKind::Ttl { ttl } => Some(now + *ttl),
            _ => None,
        };
        CheckEntry {
            rt: CheckRuntime {
                status,
                output: def.initial_output.clone(),
                modify_index: def.modify_index,
                critical_since: (status == CheckStatus::Critical).then_some(now),
                ttl_deadline,
                ttl_wake: Arc::new(Notify::new()),
            },
            def,
        }
    }
}

#[derive(Debug, Default)]
pub struct State {
    /// The global index: bumped by every change.
    pub index: u64,
    /// Index at start: the floor of every resource index (per-resource history before a
    /// restart is not kept).
    pub base: u64,
    pub services: BTreeMap<String, ServiceDef>,
    pub checks: BTreeMap<String, CheckEntry>,
    pub kv: BTreeMap<String, KvEntry>,
    /// Service name -> service IDs.
    pub by_name: BTreeMap<String, BTreeSet<String>>,
    /// Service ID -> its check IDs.
    pub service_checks: HashMap<String, BTreeSet<String>>,
    /// Node-level check IDs (no ServiceID).
    pub node_checks: BTreeSet<String>,
    services_index: u64,
    checks_index: u64,
    node_checks_index: u64,
    catalog_name_index: HashMap<String, u64>,
    health_name_index: HashMap<String, u64>,
    kv_tombstones: BTreeMap<String, u64>,
    kv_floor: u64,
    /// (index, upstream name) of every change that may alter the upstream derived for
    /// that name (its instances, their checks, its `upstreams/<name>/` KV keys), oldest
    /// first: lets the gateway re-derive only what changed.
    upstream_log: VecDeque<(u64, String)>,
    /// Changes at or below this index may be missing from `upstream_log`.
    upstream_log_floor: u64,
    /// Index of the last change that may alter every upstream (a node-level check).
    upstream_all_index: u64,
}

impl State {
    /// State as loaded at start, at global index `index` (at least 1).
    pub fn new(
        index: u64,
        services: Vec<ServiceDef>,
        checks: Vec<CheckDef>,
        kv: Vec<KvEntry>,
        now: Instant,
    ) -> State {
        let index = index.max(1);
        let mut st = State {
            index,
            base: index,
            kv_floor: index,
            upstream_log_floor: index,
            ..State::default()
        };
        for s in services {
            st.index_service(&s);
            st.services.insert(s.id.clone(), s);
        }
        for c in checks {
            // A check whose service vanished (should not happen) is dropped.
            if !c.service_id.is_empty() && !st.services.contains_key(&c.service_id) {
                continue;
            }
            st.index_check(&c);
            st.checks.insert(c.id.clone(), CheckEntry::new(c, now));
        }
        for e in kv {
            st.kv.insert(e.key.clone(), e);
        }
        st
    }

    fn index_service(&mut self, s: &ServiceDef) {
        self.by_name
            .entry(s.name.clone())
            .or_default()
            .insert(s.id.clone());
    }

    fn unindex_service(&mut self, s: &ServiceDef) {
        if let Some(ids) = self.by_name.get_mut(&s.name) {
            ids.remove(&s.id);
            if ids.is_empty() {
                self.by_name.remove(&s.name);
            }
        }
    }

    fn index_check(&mut self, c: &CheckDef) {
        if c.service_id.is_empty() {
            self.node_checks.insert(c.id.clone());
        } else {
            self.service_checks
                .entry(c.service_id.clone())
                .or_default()
                .insert(c.id.clone());
        }
    }

    fn unindex_check(&mut self, c: &CheckDef) {
        if c.service_id.is_empty() {
            self.node_checks.remove(&c.id);
        } else if let Some(ids) = self.service_checks.get_mut(&c.service_id) {
            ids.remove(&c.id);
            if ids.is_empty() {
                self.service_checks.remove(&c.service_id);
            }
        }
    }

    /// Records that the checks of `service_id` (or the node's, if empty) changed at `idx`.
    fn touch_check_owner(&mut self, service_id: &str, idx: u64) {
        self.checks_index = idx;
        if service_id.is_empty() {
            self.node_checks_index = idx;
            self.upstream_all_index = idx;
        } else if let Some(s) = self.services.get(service_id) {
            let name = s.name.clone();
            self.log_upstream(&name, idx);
            self.health_name_index.insert(name, idx);
        }
    }

    fn touch_service_name(&mut self, name: &str, idx: u64) {
        self.services_index = idx;
        self.catalog_name_index.insert(name.to_string(), idx);
        self.health_name_index.insert(name.to_string(), idx);
        self.log_upstream(name, idx);
    }

    /// A KV key under `upstreams/<name>/` changed: upstream `<name>` may have.
    fn touch_kv_key(&mut self, key: &str, idx: u64) {
        let name = key
            .strip_prefix(crate::derive::KV_UPSTREAMS_PREFIX)
            .and_then(|rest| rest.split_once('/'))
            .map(|(name, _)| name)
            .filter(|name| !name.is_empty());
        if let Some(name) = name {
            self.log_upstream(name, idx);
        }
    }

    fn log_upstream(&mut self, name: &str, idx: u64) {
        if self
            .upstream_log
            .back()
            .is_some_and(|(i, n)| *i == idx && n == name)
        {
            return;
        }
        self.upstream_log.push_back((idx, name.to_string()));
        while self.upstream_log.len() > MAX_UPSTREAM_LOG {
            if let Some((i, _)) = self.upstream_log.pop_front() {
                self.upstream_log_floor = self.upstream_log_floor.max(i);
            }
        }
    }

    /// Names of the upstreams whose derivation may have changed after index `since`, or
    /// `None` when that cannot be told (a node check changed, which touches every
    /// instance's health, or `since` is older than the log) and everything must be
    /// looked at again.
    pub fn upstreams_changed_since(&self, since: u64) -> Option<BTreeSet<&str>> {
        if since < self.upstream_log_floor || since < self.upstream_all_index || since > self.index
        {
            return None;
        }
        let start = self.upstream_log.partition_point(|(i, _)| *i <= since);
        Some(
            self.upstream_log
                .range(start..)
                .map(|(_, n)| n.as_str())
                .collect(),
        )
    }

    /// Applies one committed op at index `idx`. Ops of a batch are applied in order; a
    /// service's checks are deleted before the service and put after it.
    pub fn apply(&mut self, op: &Op, idx: u64, now: Instant) {
        match op {
            Op::PutService(s) => {
                if let Some(old) = self.services.remove(&s.id) {
                    self.unindex_service(&old);
                    self.touch_service_name(&old.name, idx);
                }
                self.index_service(s);
                self.touch_service_name(&s.name, idx);
                self.services.insert(s.id.clone(), s.clone());
            }
            Op::DeleteService(id) => {
                if let Some(old) = self.services.remove(id) {
                    self.unindex_service(&old);
                    self.touch_service_name(&old.name, idx);
                }
                // Any check left over belongs to nobody now.
                if let Some(ids) = self.service_checks.remove(id) {
                    for cid in ids {
                        self.checks.remove(&cid);
                    }
                    self.checks_index = idx;
                }
            }
            Op::PutCheck(c) => {
                let entry = match self.checks.remove(&c.id) {
                    // Same check re-registered: keep its live status.
                    Some(mut old)
                        if old.def.kind == c.kind
                            && old.def.initial_status == c.initial_status
                            && old.def.service_id == c.service_id =>
                    {
                        old.def = c.clone();
                        old.rt.modify_index = idx;
                        old
                    }
                    old => {
                        if let Some(old) = old {
                            self.unindex_check(&old.def);
                            self.touch_check_owner(&old.def.service_id, idx);
                        }
                        let mut e = CheckEntry::new(c.clone(), now);
                        e.rt.modify_index = idx;
                        e
                    }
                };
                self.index_check(c);
                self.touch_check_owner(&c.service_id, idx);
                self.checks.insert(c.id.clone(), entry);
            }
            Op::DeleteCheck(id) => {
                if let Some(old) = self.checks.remove(id) {
                    self.unindex_check(&old.def);
                    self.touch_check_owner(&old.def.service_id, idx);
                }
            }
            Op::PutKv(e) => {
                self.kv_tombstones.remove(&e.key);
                self.kv.insert(e.key.clone(), e.clone());
                self.touch_kv_key(&e.key, idx);
            }
            Op::DeleteKv(key) => {
                if self.kv.remove(key).is_some() {
                    self.touch_kv_key(key, idx);
                    self.kv_tombstones.insert(key.clone(), idx);
                    if self.kv_tombstones.len() > MAX_TOMBSTONES {
                        self.fold_tombstones();
                    }
                }
            }
            Op::SetMeta(..) => {}
        }
    }

    fn fold_tombstones(&mut self) {
        let mut idxs: Vec<u64> = self.kv_tombstones.values().copied().collect();
        idxs.sort_unstable();
        let cut = idxs[idxs.len() / 2];
        self.kv_tombstones.retain(|_, i| *i > cut);
        self.kv_floor = self.kv_floor.max(cut);
    }

    /// Sets a check's live status at index `idx` (the caller decided it is a change).
    pub fn set_check_status(
        &mut self,
        id: &str,
        status: CheckStatus,
        output: String,
        idx: u64,
        now: Instant,
    ) {
        let Some(e) = self.checks.get_mut(id) else {
            return;
        };
        if status == CheckStatus::Critical {
            if e.rt.status != CheckStatus::Critical || e.rt.critical_since.is_none() {
                e.rt.critical_since = Some(now);
            }
        } else {
            e.rt.critical_since = None;
        }
        e.rt.status = status;
        e.rt.output = output;
        e.rt.modify_index = idx;
        let owner = e.def.service_id.clone();
        self.touch_check_owner(&owner, idx);
    }

    // ---- resource indexes for blocking queries (never below `base`, never 0) ----

    pub fn kv_key_index(&self, key: &str) -> u64 {
        let e = self.kv.get(key).map_or(0, |e| e.modify_index);
        let t = self.kv_tombstones.get(key).copied().unwrap_or(0);
        e.max(t).max(self.kv_floor)
    }

    pub fn kv_prefix_index(&self, prefix: &str) -> u64 {
        let e = prefix_range(&self.kv, prefix)
            .map(|(_, e)| e.modify_index)
            .max()
            .unwrap_or(0);
        let t = prefix_range(&self.kv_tombstones, prefix)
            .map(|(_, i)| *i)
            .max()
            .unwrap_or(0);
        e.max(t).max(self.kv_floor)
    }

    pub fn services_index(&self) -> u64 {
        self.services_index.max(self.base)
    }

    pub fn checks_index(&self) -> u64 {
        self.checks_index.max(self.base)
    }

    pub fn agent_index(&self) -> u64 {
        self.services_index.max(self.checks_index).max(self.base)
    }

    pub fn catalog_service_index(&self, name: &str) -> u64 {
        self.catalog_name_index
            .get(name)
            .copied()
            .unwrap_or(0)
            .max(self.base)
    }

    pub fn health_service_index(&self, name: &str) -> u64 {
        self.health_name_index
            .get(name)
            .copied()
            .unwrap_or(0)
            .max(self.node_checks_index)
            .max(self.base)
    }

    // ---- queries ----

    /// Checks of a service (not the node's), in ID order.
    pub fn checks_of<'a>(&'a self, service_id: &str) -> impl Iterator<Item = &'a CheckEntry> + 'a {
        self.service_checks
            .get(service_id)
            .into_iter()
            .flat_map(|ids| ids.iter())
            .filter_map(|id| self.checks.get(id))
    }

    pub fn node_check_entries(&self) -> impl Iterator<Item = &CheckEntry> + '_ {
        self.node_checks.iter().filter_map(|id| self.checks.get(id))
    }

    /// Service instances with this name, in ID order.
    pub fn instances<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a ServiceDef> + 'a {
        self.by_name
            .get(name)
            .into_iter()
            .flat_map(|ids| ids.iter())
            .filter_map(|id| self.services.get(id))
    }

    /// Aggregated health of a service instance, node checks included.
    pub fn service_health(&self, service_id: &str) -> Health {
        aggregate(
            self.checks_of(service_id)
                .chain(self.node_check_entries())
                .map(|c| (c.rt.status, c.def.is_maintenance())),
        )
    }
}

/// Entries of a sorted map whose key starts with `prefix`.
pub fn prefix_range<'a, V>(
    map: &'a BTreeMap<String, V>,
    prefix: &str,
) -> impl Iterator<Item = (&'a String, &'a V)> + 'a {
    let owned = prefix.to_string();
    map.range::<str, _>((
        std::ops::Bound::Included(prefix),
        std::ops::Bound::Unbounded,
    ))
    .take_while(move |(k, _)| k.starts_with(owned.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CheckKind, Weights};
    use std::time::Duration;

    fn svc(id: &str, name: &str) -> ServiceDef {
        ServiceDef {
            id: id.into(),
            name: name.into(),
            tags: vec![],
            address: String::new(),
            port: 80,
            meta: Default::default(),
            tagged_addresses: Default::default(),
            weights: Weights::default(),
            enable_tag_override: false,
            kind: String::new(),
            create_index: 0,
            modify_index: 0,
        }
    }

    fn ttl_check(id: &str, sid: &str) -> CheckDef {
        CheckDef {
            id: id.into(),
            name: id.into(),
            notes: String::new(),
            service_id: sid.into(),
            kind: CheckKind::Ttl {
                ttl: Duration::from_secs(10),
            },
            initial_status: CheckStatus::Critical,
            initial_output: String::new(),
            deregister_after: None,
            create_index: 0,
            modify_index: 0,
        }
    }

    fn kv(key: &str, idx: u64) -> KvEntry {
        KvEntry {
            key: key.into(),
            value: vec![],
            flags: 0,
            create_index: idx,
            modify_index: idx,
            lock_index: 0,
        }
    }

    #[test]
    fn resource_indexes_follow_changes() {
        let now = Instant::now();
        let mut st = State::new(5, vec![], vec![], vec![], now);
        assert_eq!(st.health_service_index("web"), 5);
        st.apply(&Op::PutService(svc("web1", "web")), 6, now);
        st.apply(&Op::PutCheck(ttl_check("c1", "web1")), 6, now);
        assert_eq!(st.catalog_service_index("web"), 6);
        assert_eq!(st.health_service_index("web"), 6);
        assert_eq!(st.catalog_service_index("db"), 5);
        assert_eq!(st.service_health("web1"), Health::Critical);
        st.set_check_status("c1", CheckStatus::Passing, "ok".into(), 7, now);
        assert_eq!(st.catalog_service_index("web"), 6);
        assert_eq!(st.health_service_index("web"), 7);
        assert_eq!(st.service_health("web1"), Health::Passing);
        st.apply(&Op::DeleteCheck("c1".into()), 8, now);
        st.apply(&Op::DeleteService("web1".into()), 8, now);
        assert_eq!(st.catalog_service_index("web"), 8);
        assert!(st.instances("web").next().is_none());
        assert!(st.checks.is_empty());
    }

    #[test]
    fn kv_deletes_are_seen_by_prefix_watchers() {
        let now = Instant::now();
        let mut st = State::new(1, vec![], vec![], vec![], now);
        st.apply(&Op::PutKv(kv("a/1", 2)), 2, now);
        st.apply(&Op::PutKv(kv("a/2", 3)), 3, now);
        st.apply(&Op::PutKv(kv("b/1", 4)), 4, now);
        assert_eq!(st.kv_prefix_index("a/"), 3);
        st.apply(&Op::DeleteKv("a/2".into()), 5, now);
        assert_eq!(st.kv_prefix_index("a/"), 5);
        assert_eq!(st.kv_key_index("a/2"), 5);
        assert_eq!(st.kv_key_index("a/1"), 2);
        assert_eq!(st.kv_prefix_index("b/"), 4);
        assert_eq!(prefix_range(&st.kv, "a/").count(), 1);
    }

    #[test]
    fn changed_upstreams_are_logged_by_name() {
        let now = Instant::now();
        let mut st = State::new(5, vec![], vec![], vec![], now);
        assert_eq!(
            st.upstreams_changed_since(4),
            None,
            "before the start: unknown"
        );
        assert_eq!(st.upstreams_changed_since(5), Some(BTreeSet::new()));
        st.apply(&Op::PutService(svc("web1", "web")), 6, now);
        st.apply(&Op::PutCheck(ttl_check("c1", "web1")), 6, now);
        st.index = 6;
        st.apply(&Op::PutService(svc("db1", "db")), 7, now);
        st.index = 7;
        let since5: Vec<&str> = st.upstreams_changed_since(5).unwrap().into_iter().collect();
        assert_eq!(since5, ["db", "web"]);
        let since6: Vec<&str> = st.upstreams_changed_since(6).unwrap().into_iter().collect();
        assert_eq!(since6, ["db"]);
        assert_eq!(st.upstreams_changed_since(7), Some(BTreeSet::new()));
        // A check status change touches its service's upstream.
        st.set_check_status("c1", CheckStatus::Passing, "ok".into(), 8, now);
        st.index = 8;
        let since7: Vec<&str> = st.upstreams_changed_since(7).unwrap().into_iter().collect();
        assert_eq!(since7, ["web"]);
        // nginx-upsync KV keys touch upstream <name>; other keys nothing.
        st.apply(&Op::PutKv(kv("upstreams/legacy/10.0.0.1:80", 9)), 9, now);
        st.apply(&Op::PutKv(kv("config/x", 9)), 9, now);
        st.apply(&Op::PutKv(kv("upstreams/nofolder", 9)), 9, now);
        st.index = 9;
        let since8: Vec<&str> = st.upstreams_changed_since(8).unwrap().into_iter().collect();
        assert_eq!(since8, ["legacy"]);
        st.apply(
            &Op::DeleteKv("upstreams/legacy/10.0.0.1:80".into()),
            10,
            now,
        );
        st.index = 10;
        let since9: Vec<&str> = st.upstreams_changed_since(9).unwrap().into_iter().collect();
        assert_eq!(since9, ["legacy"]);
        // Deregistration touches the name it had.
        st.apply(&Op::DeleteCheck("c1".into()), 11, now);
        st.apply(&Op::DeleteService("web1".into()), 11, now);
        st.index = 11;
        let since10: Vec<&str> = st
            .upstreams_changed_since(10)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(since10, ["web"]);
        // A node check changes every instance's health: everything must be re-derived.
        st.apply(&Op::PutCheck(ttl_check("node", "")), 12, now);
        st.index = 12;
        assert_eq!(st.upstreams_changed_since(11), None);
        assert_eq!(st.upstreams_changed_since(12), Some(BTreeSet::new()));
        assert_eq!(
            st.upstreams_changed_since(13),
            None,
            "from the future: unknown"
        );
    }

    #[test]
    fn upstream_log_is_bounded() {
        let now = Instant::now();
        let mut st = State::new(1, vec![], vec![], vec![], now);
        let n = MAX_UPSTREAM_LOG as u64 + 10;
        for i in 0..n {
            st.apply(
                &Op::PutService(svc(&format!("s{i}"), &format!("n{i}"))),
                2 + i,
                now,
            );
            st.index = 2 + i;
        }
        assert!(st.upstream_log.len() <= MAX_UPSTREAM_LOG);
        assert_eq!(st.upstreams_changed_since(1), None);
        assert_eq!(st.upstreams_changed_since(n).unwrap().len(), 1);
    }

    #[test]
    fn reregistration_keeps_live_status() {
        let now = Instant::now();
        let mut st = State::new(1, vec![], vec![], vec![], now);
        st.apply(&Op::PutService(svc("web1", "web")), 2, now);
        st.apply(&Op::PutCheck(ttl_check("c1", "web1")), 2, now);
        st.set_check_status("c1", CheckStatus::Passing, "ok".into(), 3, now);
        st.apply(&Op::PutService(svc("web1", "web")), 4, now);
        st.apply(&Op::PutCheck(ttl_check("c1", "web1")), 4, now);
        assert_eq!(st.checks["c1"].rt.status, CheckStatus::Passing);
    }
}
