//! A SQLite file for durable commits, shared by the gateway's store (`dynagate.db`) and
//! the registry's (`registry.db`): how it is opened (private file modes, WAL,
//! `synchronous=FULL`, its tables), the checkpoint thread, and writes that tell a full
//! disk from other failures.
//!
//! A full disk: opening writes nothing when the tables are there, so a full disk still
//! opens and loads. Without room for the WAL index (`-shm`, 32 KiB, created at open when
//! the last clean stop removed it) the file is opened in exclusive locking mode, where
//! SQLite keeps that index in memory (until the next restart; other processes cannot
//! read the file meanwhile). Every write is tried: one that fails for want of space
//! (SQLITE_FULL, or an I/O error with ENOSPC/EDQUOT) is rolled back whole and answered
//! [`StoreError::Full`]; the first refusal is logged as a WARN, the first write that
//! succeeds again (space freed) as an INFO. No probe, no restart: the next write tells.

use crate::StoreError;
use parking_lot::Mutex;
use rusqlite::{Connection, Transaction};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How often the checkpoint thread moves the WAL into the database file.
pub(crate) const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// A store's tables: `sql` creates them (`CREATE TABLE IF NOT EXISTS …`, no
/// `BEGIN`/`COMMIT`); `version` is stored as `user_version`.
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    pub version: i64,
    pub sql: &'static str,
}

/// A write refused for want of space in the data directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the data directory {dir} is full: state is read-only until space is freed ({file}: {cause})"
)]
pub struct DiskFull {
    pub dir: String,
    pub file: String,
    pub cause: String,
}

/// One durable SQLite file and its one connection (see the module's documentation).
pub struct Durable {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    schema: Schema,
    /// The tables exist. False only when the file was new and the disk full at open:
    /// the first write that gets through creates them.
    tables: AtomicBool,
    /// The file is in WAL mode (false only in that same case).
    wal: AtomicBool,
    /// The last write was refused for want of space.
    refusing: AtomicBool,
    exclusive: bool,
    checkpointer: Option<Checkpointer>,
}

/// Whether `e`, returned by `conn`, says the file system has no space (or quota) left.
pub fn out_of_space(conn: &Connection, e: &rusqlite::Error) -> bool {
    let rusqlite::Error::SqliteFailure(failure, _) = e else {
        return false;
    };
    match failure.code {
        rusqlite::ErrorCode::DiskFull => true,
        rusqlite::ErrorCode::SystemIoFailure => {
            // SAFETY: the handle is valid while `conn` lives; the call only reads the
            // errno SQLite recorded for the connection's last failed system call.
            let errno = unsafe { rusqlite::ffi::sqlite3_system_errno(conn.handle()) };
            errno == libc::ENOSPC || errno == libc::EDQUOT
        }
        _ => false,
    }
}

/// Bytes available to this process in the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `st` a valid statvfs to fill.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Sets up one connection; returns the stored schema version. `exclusive`: locking mode
/// EXCLUSIVE, whose WAL index lives in memory instead of the `-shm` file. A journal mode
/// that cannot be set for want of space (a new, empty file on a full disk) is left for
/// the first write (`Ok((version, false))`).
fn configure(conn: &Connection, exclusive: bool) -> rusqlite::Result<(i64, bool)> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    if exclusive {
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
    }
    let wal = match set_wal(conn) {
        Ok(wal) => wal,
        Err(e) if exclusive && out_of_space(conn, &e) => false,
        Err(e) => return Err(e),
    };
    conn.pragma_update(None, "synchronous", "FULL")?;
    // With a checkpoint thread, commits never checkpoint; without one (exclusive mode),
    // SQLite's own every 1000 pages.
    conn.pragma_update(None, "wal_autocheckpoint", if exclusive { 1000 } else { 0 })?;
    // Whenever the WAL restarts, it is cut back to this size.
    conn.pragma_update(None, "journal_size_limit", 16 * 1024 * 1024)?;
    let version = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    Ok((version, wal))
}

fn set_wal(conn: &Connection) -> rusqlite::Result<bool> {
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    Ok(mode.eq_ignore_ascii_case("wal"))
}

fn create_tables(conn: &mut Connection, schema: Schema) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute_batch(schema.sql)?;
    tx.pragma_update(None, "user_version", schema.version)?;
    tx.commit()
}

impl Durable {
    /// Opens (creating if needed) a SQLite file for durable commits: WAL with
    /// `synchronous=FULL` (a commit that returned survives `kill -9` and power loss) and
    /// a busy timeout; creates the schema's tables unless they are there (then nothing is
    /// written); files private (see [`make_private`]). Checkpoints, which move the WAL
    /// into the database file and fsync it, run on a background thread every 500 ms, so a
    /// commit costs one WAL append and its fsync and never pays for a checkpoint itself.
    ///
    /// Each round is two checkpoints: one from the thread's own connection while commits
    /// go on (it moves most of the WAL and fsyncs the database), then one holding the
    /// store's connection lock, which moves the few frames committed meanwhile: with no
    /// commit landing during it, it completes, and the next commit restarts the WAL from
    /// its beginning — overwriting blocks the file already has. (With only the first
    /// kind, under steady commits the checkpoint never completed, the WAL never restarted
    /// and only grew, and a commit appending to a growing file pays for a file-system
    /// journal commit on top of its fsync — about twice the cost, measured.) Commits that
    /// arrive during the short locked step wait on the mutex, not in SQLite's sleeping
    /// busy handler.
    ///
    /// Dropping it stops the thread and closes the file: SQLite then checkpoints the
    /// whole WAL and removes the `-wal` and `-shm` files.
    pub fn open(path: &Path, schema: Schema) -> Result<Durable, StoreError> {
        make_private(path)?;
        let mut exclusive = false;
        let mut conn = Connection::open(path)?;
        let (version, wal) = match configure(&conn, false) {
            Ok(v) => v,
            Err(e) if out_of_space(&conn, &e) => {
                drop(conn);
                tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "the data directory is full: no room for the WAL index (-shm); opened in exclusive locking mode until the next restart (other processes cannot read the file meanwhile)"
                );
                exclusive = true;
                conn = Connection::open(path)?;
                configure(&conn, true)?
            }
            Err(e) => return Err(e.into()),
        };
        if version > schema.version {
            return Err(StoreError::Corrupt {
                what: path.display().to_string(),
                why: format!(
                    "schema version {version} is newer than this dynagate ({})",
                    schema.version
                ),
            });
        }
        let mut tables = true;
        if version < schema.version {
            match create_tables(&mut conn, schema) {
                Ok(()) => {}
                Err(e) if out_of_space(&conn, &e) => {
                    tracing::warn!(
                        path = %path.display(),
                        error = %e,
                        "the data directory is full: the file's tables are created at the first write that finds space; empty until then"
                    );
                    tables = false;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let conn = Arc::new(Mutex::new(conn));
        let checkpointer = match exclusive {
            true => None,
            false => Checkpointer::start(path, &conn),
        };
        Ok(Durable {
            conn,
            path: path.to_path_buf(),
            schema,
            tables: AtomicBool::new(tables),
            wal: AtomicBool::new(wal),
            refusing: AtomicBool::new(false),
            exclusive,
            checkpointer,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// False while the file has no tables yet (see [`Durable::open`]): read as empty.
    pub fn has_tables(&self) -> bool {
        self.tables.load(Ordering::Acquire)
    }

    /// True when opened in exclusive locking mode (no room for the `-shm` at open).
    pub fn exclusive(&self) -> bool {
        self.exclusive
    }

    /// Runs `f` on the connection (reads work on a full disk).
    pub fn read<T, E>(&self, f: impl FnOnce(&Connection) -> Result<T, E>) -> Result<T, E> {
        f(&self.conn.lock())
    }

    /// Runs `f` in one transaction and commits it: all of it is durable when this returns
    /// `Ok`, none of it otherwise. Out of space: [`StoreError::Full`].
    pub fn write<T>(
        &self,
        f: impl FnOnce(&Transaction) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock();
        match self.attempt(&mut conn, f) {
            Ok(v) => {
                if self.refusing.swap(false, Ordering::AcqRel) {
                    tracing::info!(path = %self.path.display(), "space in the data directory again: writes are accepted");
                }
                Ok(v)
            }
            Err(e) => Err(self.error(&conn, e)),
        }
    }

    fn attempt<T>(
        &self,
        conn: &mut Connection,
        f: impl FnOnce(&Transaction) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        if !self.wal.load(Ordering::Acquire) && set_wal(conn)? {
            self.wal.store(true, Ordering::Release);
        }
        // A transaction not committed is rolled back when dropped, on every error path.
        let tx = conn.transaction()?;
        let tables = self.has_tables();
        if !tables {
            tx.execute_batch(self.schema.sql)?;
            tx.pragma_update(None, "user_version", self.schema.version)?;
        }
        let v = f(&tx)?;
        tx.commit()?;
        if !tables {
            self.tables.store(true, Ordering::Release);
        }
        Ok(v)
    }

    fn error(&self, conn: &Connection, e: rusqlite::Error) -> StoreError {
        if !out_of_space(conn, &e) {
            return e.into();
        }
        let full = self.disk_full(&e);
        if !self.refusing.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                "{}: writes are refused and tried again with each request",
                full
            );
        }
        StoreError::Full(full)
    }

    fn disk_full(&self, e: &rusqlite::Error) -> DiskFull {
        DiskFull {
            dir: self
                .path
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            file: self
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            cause: e.to_string(),
        }
    }

    /// The connection, for tests.
    #[cfg(test)]
    pub(crate) fn lock(&self) -> parking_lot::MutexGuard<'_, Connection> {
        self.conn.lock()
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        // The thread's connection closes first: the store's is then the last one, and
        // SQLite checkpoints the WAL and removes it when it closes.
        self.checkpointer.take();
    }
}

/// The background checkpoint thread of a [`Durable`]; stopped and joined when dropped.
struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// `None` when no thread could be started: SQLite then checkpoints inline.
    fn start(path: &Path, conn: &Arc<Mutex<Connection>>) -> Option<Checkpointer> {
        let inline = || {
            let _ = conn.lock().pragma_update(None, "wal_autocheckpoint", 1000);
            None
        };
        let background = match Connection::open(path)
            .and_then(|c| c.busy_timeout(std::time::Duration::from_secs(5)).map(|_| c))
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "no checkpoint connection: checkpoints run inline");
                return inline();
            }
        };
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let target = Arc::downgrade(conn);
        let path = path.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("dynagate-checkpoint".into())
            .spawn(move || {
                let mut failing = false;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_INTERVAL)
                {
                    let Some(conn) = target.upgrade() else {
                        return;
                    };
                    let result = checkpoint(&background)
                        .map_err(|e| {
                            let full = out_of_space(&background, &e);
                            (e, full)
                        })
                        .and_then(|(frames, _)| {
                            if frames == 0 {
                                return Ok((0, 0));
                            }
                            let main = conn.lock();
                            checkpoint(&main).map_err(|e| {
                                let full = out_of_space(&main, &e);
                                (e, full)
                            })
                        });
                    match result {
                        Ok(_) if failing => {
                            failing = false;
                            tracing::info!(path = %path.display(), "WAL checkpoints succeed again");
                        }
                        Ok(_) => {}
                        Err((e, full)) if !failing => {
                            failing = true;
                            let why = if full { "the data directory is full" } else { "checkpoint failed" };
                            tracing::warn!(
                                path = %path.display(),
                                error = %e,
                                "{why}: the WAL keeps every commit (nothing is lost) and grows until a checkpoint succeeds; tried again every 500 ms"
                            );
                        }
                        Err((e, _)) => tracing::debug!(path = %path.display(), error = %e, "WAL checkpoint failed again"),
                    }
                }
            });
        match spawned {
            Ok(thread) => Some(Checkpointer {
                stop: Some(stop),
                thread: Some(thread),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "no checkpoint thread: checkpoints run inline");
                inline()
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Moves the WAL into the database file without waiting for anyone (PASSIVE); returns
/// (frames in the WAL, frames moved).
pub(crate) fn checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

/// Creates the database file with mode 0600 if it does not exist yet — SQLite gives the
/// `-wal` and `-shm` files it creates the database file's permissions — and tightens an
/// existing database file, `-wal` and `-shm` to 0600 (files of an older dynagate were
/// 0644). Nothing is truncated.
pub fn make_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let private = || std::fs::Permissions::from_mode(0o600);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        // (A umask like 0277 takes bits off 0600 too: the loop below puts them back.)
        Ok(file) => file.sync_all()?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let file = std::path::PathBuf::from(file);
        match std::fs::metadata(&file) {
            Ok(m) if m.permissions().mode() & 0o777 != 0o600 => {
                // Not fatal: a file of another owner can still be used as before.
                if let Err(e) = std::fs::set_permissions(&file, private()) {
                    tracing::warn!(file = %file.display(), error = %e, "cannot make the file private (mode 0600)");
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::{SqliteStore, Store, StoreError};
    use dynagate_model::{Command, Config, Revision, Server, Upstream};
    use std::io::Write;
    use std::path::{Path, PathBuf};

    /// A small tmpfs, unmounted when dropped. `None` (the test skips) where mounting is
    /// not permitted.
    struct Tmpfs(PathBuf);

    impl Tmpfs {
        fn mount(tag: &str, size: &str) -> Option<Tmpfs> {
            let dir =
                std::env::temp_dir().join(format!("dynagate-durable-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(&dir)
                .output();
            match out {
                Ok(o) if o.status.success() => Some(Tmpfs(dir)),
                Ok(o) => {
                    let err = String::from_utf8_lossy(&o.stderr);
                    let denied = err.contains("ermission denied") || err.contains("not permitted");
                    assert!(denied, "mount failed: {err}");
                    eprintln!("SKIPPED: cannot mount a tmpfs here (needs root): {err}");
                    None
                }
                Err(e) => {
                    eprintln!("SKIPPED: no mount command: {e}");
                    None
                }
            }
        }

        /// Writes a filler file until the file system has no byte left.
        fn fill(&self) -> PathBuf {
            let path = self.0.join("filler");
            let mut f = std::fs::File::create(&path).unwrap();
            for chunk in [64 * 1024, 4096, 1] {
                let buf = vec![0u8; chunk];
                loop {
                    match f.write(&buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                        Err(e) => panic!("filling: {e}"),
                    }
                }
            }
            let _ = f.sync_all();
            path
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    fn put(
        store: &SqliteStore,
        config: &mut Config,
        number: u64,
        port: u16,
    ) -> Result<(), StoreError> {
        let applied = config
            .apply(Command::PutUpstream {
                upstream: Box::new(Upstream::new(
                    format!("u{number}"),
                    vec![Server::new(format!("127.0.0.1:{port}"))],
                )),
                force: false,
            })
            .unwrap();
        store.commit(&Revision {
            number,
            time_ms: number,
            summary: applied.summary,
            changes: applied.changes,
        })?;
        *config = applied.config;
        Ok(())
    }

    fn exists(path: &Path, suffix: &str) -> bool {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        Path::new(&p).exists()
    }

    #[test]
    fn a_full_disk_opens_reads_and_refuses_writes_until_space_is_freed() {
        let Some(fs) = Tmpfs::mount("full", "1m") else {
            return;
        };
        let path = fs.0.join("state.db");
        let mut config = Config::default();
        let store = SqliteStore::open(&path, 100).unwrap();
        put(&store, &mut config, 1, 9001).unwrap();
        put(&store, &mut config, 2, 9002).unwrap();
        drop(store);
        assert!(
            !exists(&path, "-wal") && !exists(&path, "-shm"),
            "a clean close removes the WAL"
        );

        let filler = fs.fill();
        // No room for the -shm: exclusive mode; the state loads.
        let store = SqliteStore::open(&path, 100).unwrap();
        assert!(store.db.exclusive());
        let loaded = store.load().unwrap();
        assert_eq!((loaded.revision, &loaded.config), (2, &config));
        let before = config.clone();
        let err = put(&store, &mut config, 3, 9003).unwrap_err();
        assert!(matches!(err, StoreError::Full(_)), "{err}");
        assert!(
            err.to_string().contains("is full: state is read-only"),
            "{err}"
        );
        assert_eq!(config, before, "a refused commit changes nothing");
        assert_eq!(store.load().unwrap().revision, 2);
        assert_eq!(store.revisions(10).unwrap().len(), 2);
        // Refused again, not wedged.
        assert!(matches!(
            put(&store, &mut config, 3, 9003),
            Err(StoreError::Full(_))
        ));

        std::fs::remove_file(&filler).unwrap();
        put(&store, &mut config, 3, 9003).unwrap();
        drop(store);
        let store = SqliteStore::open(&path, 100).unwrap();
        assert!(!store.db.exclusive());
        let loaded = store.load().unwrap();
        assert_eq!((loaded.revision, &loaded.config), (3, &config));
    }

    #[test]
    fn a_new_file_on_a_full_disk_opens_empty_and_gets_its_tables_at_the_first_write() {
        let Some(fs) = Tmpfs::mount("new", "1m") else {
            return;
        };
        let path = fs.0.join("state.db");
        let filler = fs.fill();
        let store = SqliteStore::open(&path, 100).unwrap();
        assert!(!store.db.has_tables());
        assert_eq!(store.load().unwrap().revision, 0);
        assert!(store.revisions(10).unwrap().is_empty());
        let mut config = Config::default();
        assert!(matches!(
            put(&store, &mut config, 1, 9001),
            Err(StoreError::Full(_))
        ));
        std::fs::remove_file(&filler).unwrap();
        put(&store, &mut config, 1, 9001).unwrap();
        assert!(store.db.has_tables());
        drop(store);
        let store = SqliteStore::open(&path, 100).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!((loaded.revision, &loaded.config), (1, &config));
        let mode: String = store
            .db
            .read(|c| c.pragma_query_value(None, "journal_mode", |r| r.get(0)))
            .unwrap();
        assert_eq!(mode, "wal");
    }
}
