//! `<data-dir>/registry.db`: SQLite in WAL mode with `synchronous=FULL`, so a commit that
//! returned survives `kill -9` and power loss. Inspect it with `sqlite3`.

use crate::model::{CheckDef, KvEntry, ServiceDef};
use crate::store::{Batch, Op, RegistryStore, StoreError, Stored};
use rusqlite::params;
use std::path::Path;

const SCHEMA: dynagate_store::Schema = dynagate_store::Schema {
    version: 1,
    sql: "CREATE TABLE IF NOT EXISTS services (id TEXT PRIMARY KEY, def TEXT NOT NULL);
          CREATE TABLE IF NOT EXISTS checks (id TEXT PRIMARY KEY, def TEXT NOT NULL);
          CREATE TABLE IF NOT EXISTS kv (
              key TEXT PRIMARY KEY,
              value BLOB NOT NULL,
              flags INTEGER NOT NULL,
              create_index INTEGER NOT NULL,
              modify_index INTEGER NOT NULL,
              lock_index INTEGER NOT NULL
          );
          CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
};

/// Opened by [`dynagate_store::Durable`], as the gateway's store is: the same file modes,
/// WAL, checkpoints and full-disk behaviour.
pub struct SqliteStore {
    db: dynagate_store::Durable,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(SqliteStore {
            db: dynagate_store::Durable::open(path, SCHEMA)?,
        })
    }
}

fn corrupt(what: impl Into<String>, why: impl ToString) -> StoreError {
    StoreError::Corrupt {
        what: what.into(),
        why: why.to_string(),
    }
}

// SQLite integers are i64; indexes and flags are u64 stored bit-for-bit.
fn to_i64(v: u64) -> i64 {
    v as i64
}
fn to_u64(v: i64) -> u64 {
    v as u64
}

fn json<T: serde::Serialize>(v: &T) -> rusqlite::Result<String> {
    serde_json::to_string(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

impl RegistryStore for SqliteStore {
    fn load(&self) -> Result<Stored, StoreError> {
        if !self.db.has_tables() {
            return Ok(Stored::default());
        }
        self.db.read(|conn| self.load_from(conn))
    }

    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        Ok(self.db.write(|tx| write_batch(tx, batch))?)
    }
}

impl SqliteStore {
    fn load_from(&self, conn: &rusqlite::Connection) -> Result<Stored, StoreError> {
        let mut out = Stored::default();
        let mut stmt = conn.prepare("SELECT key, value FROM meta")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (k, v) = row?;
            if k == "index" {
                out.index = v.parse().map_err(|e| corrupt("meta index", e))?;
            } else {
                out.meta.push((k, v));
            }
        }
        let mut stmt = conn.prepare("SELECT id, def FROM services ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (id, def) = row?;
            let s: ServiceDef =
                serde_json::from_str(&def).map_err(|e| corrupt(format!("service {id}"), e))?;
            out.services.push(s);
        }
        let mut stmt = conn.prepare("SELECT id, def FROM checks ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (id, def) = row?;
            let c: CheckDef =
                serde_json::from_str(&def).map_err(|e| corrupt(format!("check {id}"), e))?;
            out.checks.push(c);
        }
        let mut stmt = conn.prepare(
            "SELECT key, value, flags, create_index, modify_index, lock_index FROM kv ORDER BY key",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(KvEntry {
                key: r.get(0)?,
                value: r.get(1)?,
                flags: to_u64(r.get(2)?),
                create_index: to_u64(r.get(3)?),
                modify_index: to_u64(r.get(4)?),
                lock_index: to_u64(r.get(5)?),
            })
        })?;
        for row in rows {
            out.kv.push(row?);
        }
        Ok(out)
    }
}

fn write_batch(tx: &rusqlite::Transaction, batch: &Batch) -> rusqlite::Result<()> {
    for op in &batch.ops {
        match op {
            Op::PutService(s) => {
                tx.prepare_cached("INSERT OR REPLACE INTO services (id, def) VALUES (?1, ?2)")?
                    .execute(params![s.id, json(s)?])?;
            }
            Op::DeleteService(id) => {
                tx.prepare_cached("DELETE FROM services WHERE id = ?1")?
                    .execute(params![id])?;
            }
            Op::PutCheck(c) => {
                tx.prepare_cached("INSERT OR REPLACE INTO checks (id, def) VALUES (?1, ?2)")?
                    .execute(params![c.id, json(c)?])?;
            }
            Op::DeleteCheck(id) => {
                tx.prepare_cached("DELETE FROM checks WHERE id = ?1")?
                    .execute(params![id])?;
            }
            Op::PutKv(e) => {
                tx.prepare_cached("INSERT OR REPLACE INTO kv (key, value, flags, create_index, modify_index, lock_index)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?.execute(params![
                            e.key,
                            e.value,
                            to_i64(e.flags),
                            to_i64(e.create_index),
                            to_i64(e.modify_index),
                            to_i64(e.lock_index)
                        ],
                    )?;
            }
            Op::DeleteKv(key) => {
                tx.prepare_cached("DELETE FROM kv WHERE key = ?1")?
                    .execute(params![key])?;
            }
            Op::SetMeta(k, v) => {
                tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?
                    .execute(params![k, v])?;
            }
        }
    }
    // The high-water mark only ever grows.
    tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('index', ?1)
             ON CONFLICT(key) DO UPDATE SET value = CASE
                 WHEN CAST(excluded.value AS INTEGER) > CAST(meta.value AS INTEGER)
                 THEN excluded.value ELSE meta.value END",
    )?
    .execute(params![batch.index.to_string()])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::KvEntry;

    fn temp_db(tag: &str) -> std::path::PathBuf {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).unwrap();
        let name: String = b.iter().map(|x| format!("{x:02x}")).collect();
        std::env::temp_dir().join(format!("dynagate-registry-sqlite-{tag}-{name}.db"))
    }

    fn kv(key: &str, idx: u64) -> KvEntry {
        KvEntry {
            key: key.into(),
            value: vec![0, 1, 2],
            flags: u64::MAX,
            create_index: idx,
            modify_index: idx,
            lock_index: 0,
        }
    }

    #[test]
    fn commit_load_and_high_water() {
        let path = temp_db("hw");
        {
            let s = SqliteStore::open(&path).unwrap();
            s.commit(&Batch {
                index: 10,
                ops: vec![
                    Op::PutKv(kv("a", 10)),
                    Op::SetMeta("node_id".into(), "n".into()),
                ],
            })
            .unwrap();
            // A lower high-water mark never lowers the stored one.
            s.commit(&Batch {
                index: 3,
                ops: vec![Op::PutKv(kv("b", 11)), Op::DeleteKv("a".into())],
            })
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let st = s.load().unwrap();
        assert_eq!(st.index, 10);
        assert_eq!(st.kv.len(), 1);
        assert_eq!(st.kv[0].key, "b");
        assert_eq!(st.kv[0].flags, u64::MAX, "u64 flags survive the i64 column");
        assert_eq!(st.kv[0].value, vec![0, 1, 2]);
        assert_eq!(st.meta, vec![("node_id".to_string(), "n".to_string())]);
        let mode: String =
            s.db.read(|c| c.pragma_query_value(None, "journal_mode", |r| r.get(0)))
                .unwrap();
        assert_eq!(mode, "wal");
        drop(s);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}
