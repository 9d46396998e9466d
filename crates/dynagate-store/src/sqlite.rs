use crate::durable::{Durable, Schema};
use crate::{Loaded, RevisionSummary, Store, StoreError};
use dynagate_model::{Change, Config, Revision, Route, Upstream};
use rusqlite::{params, OptionalExtension};
use std::path::Path;
use std::sync::Arc;

const SCHEMA: Schema = Schema {
    version: 1,
    sql: "CREATE TABLE IF NOT EXISTS upstreams (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
          CREATE TABLE IF NOT EXISTS routes (id TEXT PRIMARY KEY, spec TEXT NOT NULL);
          CREATE TABLE IF NOT EXISTS revisions (
              number INTEGER PRIMARY KEY,
              time_ms INTEGER NOT NULL,
              summary TEXT NOT NULL,
              changes TEXT NOT NULL
          );
          CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
};

/// The embedded store: `<data-dir>/dynagate.db`. Inspect it with `sqlite3`.
pub struct SqliteStore {
    pub(crate) db: Durable,
    /// Revisions kept for listing and rollback.
    retain: u64,
}

impl SqliteStore {
    /// Opens (creating if needed) the store; see [`Durable::open`].
    pub fn open(path: &Path, retain: u64) -> Result<Self, StoreError> {
        Ok(SqliteStore {
            db: Durable::open(path, SCHEMA)?,
            retain: retain.max(1),
        })
    }
}

fn corrupt(what: impl Into<String>, why: impl ToString) -> StoreError {
    StoreError::Corrupt {
        what: what.into(),
        why: why.to_string(),
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    // Serializing our own plain structs cannot fail.
    serde_json::to_string(v).expect("model types serialize")
}

impl Store for SqliteStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        if !self.db.has_tables() {
            return Ok(Loaded::default());
        }
        self.db.read(|conn| {
            let mut config = Config::default();
            let mut stmt = conn.prepare("SELECT name, spec FROM upstreams")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            for row in rows {
                let (name, spec) = row?;
                let up: Upstream = serde_json::from_str(&spec)
                    .map_err(|e| corrupt(format!("upstream {name}"), e))?;
                config.upstreams.insert(name, Arc::new(up));
            }
            let mut stmt = conn.prepare("SELECT id, spec FROM routes")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            for row in rows {
                let (id, spec) = row?;
                let route: Route =
                    serde_json::from_str(&spec).map_err(|e| corrupt(format!("route {id}"), e))?;
                config.routes.insert(id, Arc::new(route));
            }
            let revision: Option<i64> = conn
                .query_row("SELECT MAX(number) FROM revisions", [], |r| r.get(0))
                .optional()?
                .flatten();
            let stored_last: Option<String> = conn
                .query_row(
                    "SELECT value FROM meta WHERE key = 'last_revision'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let last = stored_last.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            Ok(Loaded {
                config,
                revision: last.max(revision.unwrap_or(0) as u64),
            })
        })
    }

    fn commit(&self, revision: &Revision) -> Result<(), StoreError> {
        self.db.write(|tx| {
            for change in &revision.changes {
                match change {
                    Change::Upstream { key, after, .. } => match after {
                        Some(up) => {
                            tx.prepare_cached(
                                "INSERT OR REPLACE INTO upstreams (name, spec) VALUES (?1, ?2)",
                            )?
                            .execute(params![key, to_json(&**up)])?;
                        }
                        None => {
                            tx.prepare_cached("DELETE FROM upstreams WHERE name = ?1")?
                                .execute(params![key])?;
                        }
                    },
                    Change::Route { key, after, .. } => match after {
                        Some(route) => {
                            tx.prepare_cached(
                                "INSERT OR REPLACE INTO routes (id, spec) VALUES (?1, ?2)",
                            )?
                            .execute(params![key, to_json(&**route)])?;
                        }
                        None => {
                            tx.prepare_cached("DELETE FROM routes WHERE id = ?1")?
                                .execute(params![key])?;
                        }
                    },
                }
            }
            tx.prepare_cached(
                "INSERT INTO revisions (number, time_ms, summary, changes) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                revision.number as i64,
                revision.time_ms as i64,
                revision.summary,
                to_json(&revision.changes)
            ])?;
            tx.prepare_cached(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_revision', ?1)",
            )?
            .execute(params![revision.number.to_string()])?;
            if revision.number > self.retain {
                tx.prepare_cached("DELETE FROM revisions WHERE number <= ?1")?
                    .execute(params![(revision.number - self.retain) as i64])?;
            }
            Ok(())
        })
    }

    fn revisions(&self, limit: usize) -> Result<Vec<RevisionSummary>, StoreError> {
        if !self.db.has_tables() {
            return Ok(Vec::new());
        }
        self.db.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT number, time_ms, summary FROM revisions ORDER BY number DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map(params![limit as i64], |r| {
                Ok(RevisionSummary {
                    number: r.get::<_, i64>(0)? as u64,
                    time_ms: r.get::<_, i64>(1)? as u64,
                    summary: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn revisions_after(&self, number: u64) -> Result<Vec<Revision>, StoreError> {
        if !self.db.has_tables() {
            return Ok(Vec::new());
        }
        self.db.read(|conn| {
        let mut stmt = conn.prepare_cached(
            "SELECT number, time_ms, summary, changes FROM revisions WHERE number > ?1 ORDER BY number DESC",
        )?;
        let rows = stmt.query_map(params![number as i64], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (number, time_ms, summary, changes) = row?;
            let changes: Vec<Change> = serde_json::from_str(&changes)
                .map_err(|e| corrupt(format!("revision {number}"), e))?;
            out.push(Revision {
                number,
                time_ms,
                summary,
                changes,
            });
        }
        Ok(out)
        })
    }

    fn oldest_restorable(&self) -> Result<u64, StoreError> {
        if !self.db.has_tables() {
            return Ok(0);
        }
        let oldest: Option<i64> = self
            .db
            .read(|conn| conn.query_row("SELECT MIN(number) FROM revisions", [], |r| r.get(0)))?;
        // The state before the oldest retained revision can be rebuilt by undoing it.
        Ok(oldest.map(|n| (n as u64).saturating_sub(1)).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::{checkpoint, CHECKPOINT_INTERVAL};
    use dynagate_model::{Command, Server};

    #[test]
    fn the_wal_restarts_after_each_checkpoint() {
        let dir = std::env::temp_dir().join(format!("dynagate-store-wal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.db");
        let _ = std::fs::remove_file(&path);
        let store = SqliteStore::open(&path, 1000).unwrap();
        let mut config = Config::default();
        let mut number = 0;
        let mut commit = |config: &mut Config| {
            number += 1;
            let applied = config
                .apply(Command::PutUpstream {
                    upstream: Box::new(Upstream::new(
                        format!("u{}", number % 7),
                        vec![Server::new(format!("127.0.0.1:{}", 9000 + number))],
                    )),
                    force: false,
                })
                .unwrap();
            store
                .commit(&Revision {
                    number,
                    time_ms: number,
                    summary: applied.summary,
                    changes: applied.changes,
                })
                .unwrap();
            *config = applied.config;
        };
        for _ in 0..50 {
            commit(&mut config);
        }
        let (frames, moved) = checkpoint(&store.db.lock()).unwrap();
        assert!(frames > 50, "{frames}");
        assert_eq!(moved, frames, "with the lock held the checkpoint completes");
        // The next commit starts the WAL over instead of appending to it.
        commit(&mut config);
        let (after, _) = checkpoint(&store.db.lock()).unwrap();
        assert!(
            after < frames / 10,
            "{after} frames after a restart, {frames} before"
        );
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The WAL's checkpoint sequence number: bumped each time the WAL restarts.
    fn wal_restarts(wal: &std::path::Path) -> u32 {
        let head = std::fs::read(wal).unwrap_or_default();
        head.get(12..16)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    #[test]
    fn the_wal_restarts_under_steady_commits() {
        let dir =
            std::env::temp_dir().join(format!("dynagate-store-steady-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.db");
        let _ = std::fs::remove_file(&path);
        let store = SqliteStore::open(&path, 100).unwrap();
        let mut config = Config::default();
        let wal = path.with_extension("db-wal");
        let start = std::time::Instant::now();
        let mut number = 0u64;
        // Commits back to back for five checkpoint intervals.
        while start.elapsed() < CHECKPOINT_INTERVAL * 5 + CHECKPOINT_INTERVAL / 5 {
            number += 1;
            let applied = config
                .apply(Command::PutUpstream {
                    upstream: Box::new(Upstream::new(
                        format!("u{}", number % 50),
                        vec![Server::new(format!("127.0.0.1:{}", 1000 + number % 60000))],
                    )),
                    force: false,
                })
                .unwrap();
            store
                .commit(&Revision {
                    number,
                    time_ms: number,
                    summary: applied.summary,
                    changes: applied.changes,
                })
                .unwrap();
            config = applied.config;
        }
        let restarts = wal_restarts(&wal);
        assert!(
            restarts >= 2,
            "{number} commits, the WAL restarted {restarts} times"
        );
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn mode(path: &std::path::Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn database_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("dynagate-store-modes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.db");
        let wal = dir.join("m.db-wal");
        let shm = dir.join("m.db-shm");
        let store = SqliteStore::open(&path, 10).unwrap();
        store.load().unwrap();
        for file in [&path, &wal, &shm] {
            assert_eq!(mode(file), 0o600, "{} when created", file.display());
        }
        drop(store);
        // Files of an older dynagate were 0644: tightened at open, db, -wal and -shm.
        for suffix in ["", "-wal", "-shm"] {
            let file = dir.join(format!("m.db{suffix}"));
            if !file.exists() {
                std::fs::write(&file, b"").unwrap();
            }
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let store = SqliteStore::open(&path, 10).unwrap();
        for file in [&path, &wal, &shm] {
            assert_eq!(mode(file), 0o600, "{} after open", file.display());
        }
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn commit_load_and_rewind() {
        let dir = std::env::temp_dir().join(format!("dynagate-store-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        let _ = std::fs::remove_file(&path);
        let store = SqliteStore::open(&path, 2).unwrap();
        let mut config = Config::default();
        for (n, port) in [(1u64, 9001), (2, 9002), (3, 9003)] {
            let applied = config
                .apply(Command::PutUpstream {
                    upstream: Box::new(Upstream::new(
                        "u",
                        vec![Server::new(format!("127.0.0.1:{port}"))],
                    )),
                    force: false,
                })
                .unwrap();
            store
                .commit(&Revision {
                    number: n,
                    time_ms: n,
                    summary: applied.summary,
                    changes: applied.changes,
                })
                .unwrap();
            config = applied.config;
        }
        drop(store);
        let store = SqliteStore::open(&path, 2).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.revision, 3);
        assert_eq!(loaded.config, config);
        assert_eq!(store.revisions(10).unwrap().len(), 2);
        assert_eq!(store.oldest_restorable().unwrap(), 1);
        let back = loaded.config.rewind(&store.revisions_after(1).unwrap(), 1);
        assert_eq!(back.upstreams["u"].servers[0].address, "127.0.0.1:9001");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
