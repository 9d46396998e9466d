//! Registry operations on services and checks, independent of HTTP: each plans the ops
//! of one durable write from the current state, or updates a check's live status.

use crate::model::{
    CheckDef, CheckKind, CheckStatus, ServiceDef, DEFAULT_NODE_MAINT_REASON,
    DEFAULT_SERVICE_MAINT_REASON, NODE_MAINT_ID, NODE_MAINT_NAME, SERVICE_MAINT_NAME,
    SERVICE_MAINT_PREFIX,
};
use crate::store::Op;
use crate::{unknown_service, ApiError, Planned, Registry};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// A check as given in a registration, before IDs and defaults are settled.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CheckSpec {
    pub id: Option<String>,
    pub name: Option<String>,
    pub notes: String,
    pub service_id: Option<String>,
    pub kind: CheckKind,
    pub status: Option<CheckStatus>,
    pub deregister_after: Option<Duration>,
}

#[derive(Clone, Debug)]
pub(crate) struct ServiceRegistration {
    /// Indexes are filled in by the write.
    pub def: ServiceDef,
    pub checks: Vec<CheckSpec>,
    pub replace_existing_checks: bool,
}

fn check_def(
    spec: CheckSpec,
    id: String,
    name: String,
    service_id: String,
    old: Option<&CheckDef>,
    next: u64,
    min_deregister: Duration,
) -> CheckDef {
    let deregister_after = if service_id.is_empty() {
        None
    } else {
        spec.deregister_after
            .filter(|d| !d.is_zero())
            .map(|d| d.max(min_deregister))
    };
    CheckDef {
        id,
        name,
        notes: spec.notes,
        service_id,
        kind: spec.kind,
        initial_status: spec.status.unwrap_or(CheckStatus::Critical),
        initial_output: String::new(),
        deregister_after,
        create_index: old.map_or(next, |o| o.create_index),
        modify_index: next,
    }
}

impl Registry {
    pub(crate) async fn register_service(
        self: &Arc<Self>,
        reg: ServiceRegistration,
    ) -> Result<(), ApiError> {
        let min_dereg = self.opts.min_deregister_after;
        self.write(move |st, next| {
            let mut def = reg.def;
            let old = st.services.get(&def.id);
            def.create_index = old.map_or(next, |o| o.create_index);
            def.modify_index = next;
            let sid = def.id.clone();
            let sname = def.name.clone();
            let mut ops = vec![Op::PutService(def)];
            let many = reg.checks.len() > 1;
            let mut kept = BTreeSet::new();
            for (i, spec) in reg.checks.into_iter().enumerate() {
                let id = match spec.id.clone().filter(|s| !s.is_empty()) {
                    Some(id) => id,
                    None if many => format!("service:{sid}:{}", i + 1),
                    None => format!("service:{sid}"),
                };
                let name = spec
                    .name
                    .clone()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| format!("Service '{sname}' check"));
                let old = st.checks.get(&id).map(|c| &c.def);
                kept.insert(id.clone());
                ops.push(Op::PutCheck(check_def(
                    spec,
                    id,
                    name,
                    sid.clone(),
                    old,
                    next,
                    min_dereg,
                )));
            }
            if reg.replace_existing_checks {
                for c in st.checks_of(&sid) {
                    if !kept.contains(&c.def.id) && !c.def.is_maintenance() {
                        ops.push(Op::DeleteCheck(c.def.id.clone()));
                    }
                }
            }
            Ok(Planned { ops, result: () })
        })
        .await
    }

    pub(crate) async fn deregister_service(self: &Arc<Self>, id: String) -> Result<(), ApiError> {
        self.write(move |st, _| {
            if !st.services.contains_key(&id) {
                return Err(unknown_service(&id));
            }
            let mut ops: Vec<Op> = st
                .checks_of(&id)
                .map(|c| Op::DeleteCheck(c.def.id.clone()))
                .collect();
            ops.push(Op::DeleteService(id));
            Ok(Planned { ops, result: () })
        })
        .await
    }

    pub(crate) async fn service_maintenance(
        self: &Arc<Self>,
        id: String,
        enable: bool,
        reason: String,
    ) -> Result<(), ApiError> {
        self.write(move |st, next| {
            if !st.services.contains_key(&id) {
                return Err(unknown_service(&id));
            }
            let check_id = format!("{SERVICE_MAINT_PREFIX}{id}");
            let existing = st.checks.get(&check_id).map(|c| &c.def);
            let ops = if enable {
                let notes = if reason.is_empty() {
                    DEFAULT_SERVICE_MAINT_REASON.to_string()
                } else {
                    reason
                };
                vec![Op::PutCheck(CheckDef {
                    id: check_id,
                    name: SERVICE_MAINT_NAME.into(),
                    notes,
                    service_id: id,
                    kind: CheckKind::Maintenance,
                    initial_status: CheckStatus::Critical,
                    initial_output: String::new(),
                    deregister_after: None,
                    create_index: existing.map_or(next, |c| c.create_index),
                    modify_index: next,
                })]
            } else if existing.is_some() {
                vec![Op::DeleteCheck(check_id)]
            } else {
                vec![]
            };
            Ok(Planned { ops, result: () })
        })
        .await
    }

    pub(crate) async fn node_maintenance(
        self: &Arc<Self>,
        enable: bool,
        reason: String,
    ) -> Result<(), ApiError> {
        self.write(move |st, next| {
            let existing = st.checks.get(NODE_MAINT_ID).map(|c| &c.def);
            let ops = if enable {
                let notes = if reason.is_empty() {
                    DEFAULT_NODE_MAINT_REASON.to_string()
                } else {
                    reason
                };
                vec![Op::PutCheck(CheckDef {
                    id: NODE_MAINT_ID.into(),
                    name: NODE_MAINT_NAME.into(),
                    notes,
                    service_id: String::new(),
                    kind: CheckKind::Maintenance,
                    initial_status: CheckStatus::Critical,
                    initial_output: String::new(),
                    deregister_after: None,
                    create_index: existing.map_or(next, |c| c.create_index),
                    modify_index: next,
                })]
            } else if existing.is_some() {
                vec![Op::DeleteCheck(NODE_MAINT_ID.into())]
            } else {
                vec![]
            };
            Ok(Planned { ops, result: () })
        })
        .await
    }

    /// `PUT /agent/check/register`: `spec.name` is required (checked by the caller).
    pub(crate) async fn register_check(self: &Arc<Self>, spec: CheckSpec) -> Result<(), ApiError> {
        let min_dereg = self.opts.min_deregister_after;
        self.write(move |st, next| {
            let service_id = spec.service_id.clone().unwrap_or_default();
            if !service_id.is_empty() && !st.services.contains_key(&service_id) {
                return Err(ApiError::bad_request(format!(
                    "ServiceID {service_id:?} does not exist"
                )));
            }
            let name = spec.name.clone().unwrap_or_default();
            let id = spec
                .id
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| name.clone());
            let old = st.checks.get(&id).map(|c| &c.def);
            let def = check_def(spec, id, name, service_id, old, next, min_dereg);
            Ok(Planned {
                ops: vec![Op::PutCheck(def)],
                result: (),
            })
        })
        .await
    }

    pub(crate) async fn deregister_check(self: &Arc<Self>, id: String) -> Result<(), ApiError> {
        self.write(move |st, _| {
            if !st.checks.contains_key(&id) {
                return Err(crate::unknown_check(&id));
            }
            Ok(Planned {
                ops: vec![Op::DeleteCheck(id)],
                result: (),
            })
        })
        .await
    }

    /// pass / warn / fail / update on a TTL check: sets the status and output and restarts
    /// the TTL timer.
    pub(crate) async fn ttl_update(
        self: &Arc<Self>,
        id: String,
        status: CheckStatus,
        output: String,
    ) -> Result<(), ApiError> {
        let id2 = id.clone();
        self.update_check(id, move |e, now| {
            let CheckKind::Ttl { ttl } = e.def.kind else {
                return Err(ApiError::internal(format!(
                    "CheckID {id2:?} does not have associated TTL"
                )));
            };
            if e.rt.ttl_deadline.is_none() {
                e.rt.ttl_wake.notify_one();
            }
            e.rt.ttl_deadline = Some(now + ttl);
            if e.rt.status == status && e.rt.output == output {
                Ok(None)
            } else {
                Ok(Some((status, output)))
            }
        })
        .await
    }
}
