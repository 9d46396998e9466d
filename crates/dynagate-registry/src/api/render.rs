//! Consul's JSON shapes. Field names in Consul's casing; lists and maps are never null.

use crate::duration::format_go_duration;
use crate::model::{KvEntry, ServiceDef};
use crate::state::{CheckEntry, State};
use crate::Registry;
use base64::Engine as _;
use serde_json::{json, Map, Value};

pub(crate) const SERF_CHECK_ID: &str = "serfHealth";

fn tagged_addresses(s: &ServiceDef) -> Value {
    let m: Map<String, Value> = s
        .tagged_addresses
        .iter()
        .map(|(k, a)| (k.clone(), json!({"Address": a.address, "Port": a.port})))
        .collect();
    Value::Object(m)
}

fn weights(s: &ServiceDef) -> Value {
    json!({"Passing": s.weights.passing, "Warning": s.weights.warning})
}

impl Registry {
    /// `GET /agent/services` item.
    pub(crate) fn render_agent_service(&self, s: &ServiceDef) -> Value {
        let mut v = json!({
            "ID": s.id,
            "Service": s.name,
            "Tags": s.tags,
            "Meta": s.meta,
            "Port": s.port,
            "Address": s.address,
            "TaggedAddresses": tagged_addresses(s),
            "Weights": weights(s),
            "EnableTagOverride": s.enable_tag_override,
            "CreateIndex": s.create_index,
            "ModifyIndex": s.modify_index,
            "Datacenter": self.opts.datacenter,
        });
        if !s.kind.is_empty() {
            v["Kind"] = json!(s.kind);
        }
        v
    }

    /// The `Service` object of a `/health/service` entry.
    pub(crate) fn render_health_service(&self, s: &ServiceDef) -> Value {
        let mut v = json!({
            "ID": s.id,
            "Service": s.name,
            "Tags": s.tags,
            "Address": s.address,
            "TaggedAddresses": tagged_addresses(s),
            "Meta": s.meta,
            "Port": s.port,
            "Weights": weights(s),
            "EnableTagOverride": s.enable_tag_override,
            "CreateIndex": s.create_index,
            "ModifyIndex": s.modify_index,
        });
        if !s.kind.is_empty() {
            v["Kind"] = json!(s.kind);
        }
        v
    }

    fn node_tagged_addresses(&self) -> Value {
        let a = &self.opts.node_address;
        json!({"lan": a, "lan_ipv4": a, "wan": a, "wan_ipv4": a})
    }

    /// The `Node` object of a `/health/service` entry (and `/catalog/nodes` item).
    pub(crate) fn render_node(&self) -> Value {
        json!({
            "ID": self.node_id,
            "Node": self.opts.node_name,
            "Address": self.opts.node_address,
            "Datacenter": self.opts.datacenter,
            "TaggedAddresses": self.node_tagged_addresses(),
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": 1,
            "ModifyIndex": 1,
        })
    }

    /// `GET /catalog/service/:name` item.
    pub(crate) fn render_catalog_service(&self, s: &ServiceDef) -> Value {
        json!({
            "ID": self.node_id,
            "Node": self.opts.node_name,
            "Address": self.opts.node_address,
            "Datacenter": self.opts.datacenter,
            "TaggedAddresses": self.node_tagged_addresses(),
            "NodeMeta": {"consul-network-segment": ""},
            "ServiceKind": s.kind,
            "ServiceID": s.id,
            "ServiceName": s.name,
            "ServiceTags": s.tags,
            "ServiceAddress": s.address,
            "ServiceTaggedAddresses": tagged_addresses(s),
            "ServiceWeights": weights(s),
            "ServiceMeta": s.meta,
            "ServicePort": s.port,
            "ServiceEnableTagOverride": s.enable_tag_override,
            "ServiceProxy": {},
            "ServiceConnect": {},
            "CreateIndex": s.create_index,
            "ModifyIndex": s.modify_index,
        })
    }

    /// A health check as `/agent/checks`, `/health/*` show it.
    pub(crate) fn render_check(&self, st: &State, c: &CheckEntry) -> Value {
        let (service_name, service_tags) = match st.services.get(&c.def.service_id) {
            Some(s) => (s.name.clone(), s.tags.clone()),
            None => (String::new(), Vec::new()),
        };
        let dur = |d: Option<std::time::Duration>| d.map(format_go_duration).unwrap_or_default();
        json!({
            "Node": self.opts.node_name,
            "CheckID": c.def.id,
            "Name": c.def.name,
            "Status": c.rt.status.as_str(),
            "Notes": c.def.notes,
            "Output": c.rt.output,
            "ServiceID": c.def.service_id,
            "ServiceName": service_name,
            "ServiceTags": service_tags,
            "Type": c.def.kind.type_name(),
            "Interval": dur(c.def.kind.interval()),
            "Timeout": dur(c.def.kind.timeout()),
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": c.def.create_index,
            "ModifyIndex": c.rt.modify_index,
        })
    }

    /// The node's `serfHealth` check: the registry is its own node, always alive.
    pub(crate) fn render_serf_check(&self) -> Value {
        json!({
            "Node": self.opts.node_name,
            "CheckID": SERF_CHECK_ID,
            "Name": "Serf Health Status",
            "Status": "passing",
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": 1,
            "ModifyIndex": 1,
        })
    }

    /// Node-level checks (serfHealth first) with their statuses.
    pub(crate) fn node_checks(&self, st: &State) -> Vec<(Value, bool)> {
        let mut out = vec![(self.render_serf_check(), true)];
        for c in st.node_check_entries() {
            out.push((
                self.render_check(st, c),
                c.rt.status == crate::model::CheckStatus::Passing,
            ));
        }
        out
    }

    pub(crate) fn render_member(&self) -> Value {
        json!({
            "Name": self.opts.node_name,
            "Addr": self.opts.node_address,
            "Port": 8301,
            "Tags": {
                "dc": self.opts.datacenter,
                "id": self.node_id,
                "role": "consul",
                "port": "8300",
                "build": format!("{}:dynagate", CONSUL_VERSION),
                "vsn": "2",
                "vsn_min": "2",
                "vsn_max": "3",
            },
            "Status": 1,
            "ProtocolMin": 1,
            "ProtocolMax": 5,
            "ProtocolCur": 2,
            "DelegateMin": 2,
            "DelegateMax": 5,
            "DelegateCur": 4,
        })
    }
}

/// The Consul version we answer as (the API level implemented).
pub(crate) const CONSUL_VERSION: &str = "1.17.0";

/// A KV entry; `Value` is base64, or null when empty.
pub(crate) fn render_kv(e: &KvEntry) -> Value {
    let value = if e.value.is_empty() {
        Value::Null
    } else {
        Value::String(base64::engine::general_purpose::STANDARD.encode(&e.value))
    };
    json!({
        "LockIndex": e.lock_index,
        "Key": e.key,
        "Flags": e.flags,
        "Value": value,
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    })
}
