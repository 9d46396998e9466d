//! The registry's data: service and check definitions, KV entries, health statuses and
//! their aggregation. Pure: no I/O. These are also the records the store persists.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// A check's status as Consul reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Passing,
    Warning,
    Critical,
}

impl CheckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Passing => "passing",
            CheckStatus::Warning => "warning",
            CheckStatus::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<CheckStatus> {
        match s {
            "passing" => Some(CheckStatus::Passing),
            "warning" => Some(CheckStatus::Warning),
            "critical" => Some(CheckStatus::Critical),
            _ => None,
        }
    }
}

impl fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The aggregated health of a service instance: maintenance > critical > warning > passing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Passing,
    Warning,
    Critical,
    Maintenance,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
            Health::Maintenance => "maintenance",
        }
    }
}

/// Aggregates check statuses: any maintenance check wins, then the worst status;
/// no checks at all is passing.
pub fn aggregate<I>(checks: I) -> Health
where
    I: IntoIterator<Item = (CheckStatus, bool)>,
{
    let mut worst = Health::Passing;
    for (status, maintenance) in checks {
        let h = if maintenance {
            Health::Maintenance
        } else {
            match status {
                CheckStatus::Passing => Health::Passing,
                CheckStatus::Warning => Health::Warning,
                CheckStatus::Critical => Health::Critical,
            }
        };
        worst = worst.max(h);
    }
    worst
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weights {
    pub passing: i64,
    pub warning: i64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            passing: 1,
            warning: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaggedAddress {
    pub address: String,
    pub port: u16,
}

/// A registered service instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDef {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    #[serde(default)]
    pub tagged_addresses: BTreeMap<String, TaggedAddress>,
    #[serde(default)]
    pub weights: Weights,
    #[serde(default)]
    pub enable_tag_override: bool,
    #[serde(default)]
    pub kind: String,
    pub create_index: u64,
    pub modify_index: u64,
}

/// What a check does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum CheckKind {
    Http {
        url: String,
        method: String,
        #[serde(default)]
        header: BTreeMap<String, Vec<String>>,
        #[serde(default)]
        body: String,
        #[serde(default)]
        tls_skip_verify: bool,
        interval: Duration,
        timeout: Duration,
    },
    Tcp {
        address: String,
        interval: Duration,
        timeout: Duration,
    },
    Ttl {
        ttl: Duration,
    },
    /// `_service_maintenance:<id>` / `_node_maintenance`: always critical.
    Maintenance,
}

impl CheckKind {
    /// The `Type` field Consul reports.
    pub fn type_name(&self) -> &'static str {
        match self {
            CheckKind::Http { .. } => "http",
            CheckKind::Tcp { .. } => "tcp",
            CheckKind::Ttl { .. } => "ttl",
            CheckKind::Maintenance => "maintenance",
        }
    }

    pub fn interval(&self) -> Option<Duration> {
        match self {
            CheckKind::Http { interval, .. } | CheckKind::Tcp { interval, .. } => Some(*interval),
            _ => None,
        }
    }

    pub fn timeout(&self) -> Option<Duration> {
        match self {
            CheckKind::Http { timeout, .. } | CheckKind::Tcp { timeout, .. } => Some(*timeout),
            _ => None,
        }
    }
}

/// A registered check. `service_id` is empty for a node-level check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckDef {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub notes: String,
    #[serde(default)]
    pub service_id: String,
    pub kind: CheckKind,
    /// The status the check starts in (at registration and after a restart).
    pub initial_status: CheckStatus,
    /// Output shown until the check first runs (maintenance reason, etc.).
    #[serde(default)]
    pub initial_output: String,
    #[serde(default)]
    pub deregister_after: Option<Duration>,
    pub create_index: u64,
    pub modify_index: u64,
}

impl CheckDef {
    pub fn is_maintenance(&self) -> bool {
        matches!(self.kind, CheckKind::Maintenance)
    }
}

/// Maintenance check IDs and defaults, as Consul names them.
pub const NODE_MAINT_ID: &str = "_node_maintenance";
pub const SERVICE_MAINT_PREFIX: &str = "_service_maintenance:";
pub const SERVICE_MAINT_NAME: &str = "Service Maintenance Mode";
pub const NODE_MAINT_NAME: &str = "Node Maintenance Mode";
pub const DEFAULT_SERVICE_MAINT_REASON: &str =
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.";
pub const DEFAULT_NODE_MAINT_REASON: &str =
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message.";

/// A KV entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub key: String,
    pub value: Vec<u8>,
    pub flags: u64,
    pub create_index: u64,
    pub modify_index: u64,
    pub lock_index: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregation_order() {
        use CheckStatus::*;
        assert_eq!(aggregate(Vec::new()), Health::Passing);
        assert_eq!(
            aggregate([(Passing, false), (Warning, false)]),
            Health::Warning
        );
        assert_eq!(
            aggregate([(Critical, false), (Warning, false)]),
            Health::Critical
        );
        assert_eq!(
            aggregate([(Critical, false), (Critical, true), (Passing, false)]),
            Health::Maintenance
        );
    }

    #[test]
    fn records_roundtrip_json() {
        let c = CheckDef {
            id: "service:web".into(),
            name: "n".into(),
            notes: String::new(),
            service_id: "web".into(),
            kind: CheckKind::Http {
                url: "http://127.0.0.1:1/h".into(),
                method: "GET".into(),
                header: BTreeMap::new(),
                body: String::new(),
                tls_skip_verify: false,
                interval: Duration::from_secs(10),
                timeout: Duration::from_secs(1),
            },
            initial_status: CheckStatus::Critical,
            initial_output: String::new(),
            deregister_after: Some(Duration::from_secs(60)),
            create_index: 3,
            modify_index: 4,
        };
        let s = serde_json::to_string(&c).unwrap();
        let back: CheckDef = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
    }
}
