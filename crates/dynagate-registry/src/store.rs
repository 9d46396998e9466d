//! Durable storage behind a trait: the embedded SQLite store today, etcd later.
//!
//! The registry keeps its whole state in memory and writes through: a change is applied
//! to memory (and acknowledged) only after `commit` returned. Implementations must make a
//! committed batch durable (fsync) and atomic (all ops or none).

use crate::model::{CheckDef, KvEntry, ServiceDef};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("registry store I/O error: {0}")]
    Io(String),
    #[error("registry store is corrupt: {what}: {why}")]
    Corrupt { what: String, why: String },
    /// A write refused for want of space; nothing of it was applied.
    #[error(transparent)]
    Full(dynagate_store::DiskFull),
}

impl From<dynagate_store::StoreError> for StoreError {
    fn from(e: dynagate_store::StoreError) -> Self {
        match e {
            dynagate_store::StoreError::Full(full) => StoreError::Full(full),
            dynagate_store::StoreError::Corrupt { what, why } => StoreError::Corrupt { what, why },
            e => StoreError::Io(e.to_string()),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// One change inside a batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    PutService(ServiceDef),
    DeleteService(String),
    PutCheck(CheckDef),
    DeleteCheck(String),
    PutKv(KvEntry),
    DeleteKv(String),
    /// Small registry facts, e.g. the node ID.
    SetMeta(String, String),
}

/// What `commit` writes atomically. `index` is the high-water mark of the global index:
/// after a restart the registry starts at (at least) the last committed value, so the
/// index never goes backwards.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub index: u64,
    pub ops: Vec<Op>,
}

/// Everything the registry loads at start.
#[derive(Clone, Debug, Default)]
pub struct Stored {
    pub index: u64,
    pub meta: Vec<(String, String)>,
    pub services: Vec<ServiceDef>,
    pub checks: Vec<CheckDef>,
    pub kv: Vec<KvEntry>,
}

/// Blocking storage API; the registry calls it from blocking threads, one batch at a time.
pub trait RegistryStore: Send + Sync + 'static {
    fn load(&self) -> Result<Stored, StoreError>;
    /// Durably and atomically applies `batch`. On error nothing was applied.
    fn commit(&self, batch: &Batch) -> Result<(), StoreError>;
}
