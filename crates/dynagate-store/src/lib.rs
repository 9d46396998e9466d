//! Durable state. `Store` is what the control plane needs from a store; `SqliteStore` is
//! the embedded implementation (one SQLite file in WAL mode, `synchronous=FULL`, so a
//! commit that returned survives `kill -9` and power loss). etcd comes later behind the
//! same trait.

mod durable;
mod sqlite;

pub use durable::{free_bytes, make_private, out_of_space, DiskFull, Durable, Schema};
use dynagate_model::{Config, Revision};
pub use sqlite::SqliteStore;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store: corrupt record {what}: {why}")]
    Corrupt { what: String, why: String },
    #[error("store: {0}")]
    Io(#[from] std::io::Error),
    /// A write refused for want of space; nothing of it was applied.
    #[error(transparent)]
    Full(#[from] DiskFull),
}

/// The state loaded at start: the configuration and the number of its last revision.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub config: Config,
    pub revision: u64,
}

/// A revision without its entity changes, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionSummary {
    pub number: u64,
    pub time_ms: u64,
    pub summary: String,
}

pub trait Store: Send + Sync + 'static {
    /// The last committed state.
    fn load(&self) -> Result<Loaded, StoreError>;
    /// Makes `revision` durable: its changes and the revision record, all or nothing.
    /// Returns only once the data is on stable storage.
    fn commit(&self, revision: &Revision) -> Result<(), StoreError>;
    /// Up to `limit` revisions, newest first.
    fn revisions(&self, limit: usize) -> Result<Vec<RevisionSummary>, StoreError>;
    /// Every retained revision newer than `number`, newest first, with their changes.
    fn revisions_after(&self, number: u64) -> Result<Vec<Revision>, StoreError>;
    /// The oldest revision whose state can still be rebuilt (0 = the empty start).
    fn oldest_restorable(&self) -> Result<u64, StoreError>;
}
