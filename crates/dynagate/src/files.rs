//! Files dynagate writes whole (`run.json`, `admin.token`) are never truncated in place:
//! each is written to a temporary file in the same directory, fsynced, and renamed over
//! the old one. A reader sees the old content or the new, never a part; a write that
//! fails (a full disk) leaves the old file as it was. The SQLite files are SQLite's.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Whether [`write_atomic`] may replace an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Replace,
    /// Fail with `AlreadyExists` instead (someone else created it meanwhile).
    Keep,
}

/// Writes `contents` to `path` with `mode`: a temporary file in the same directory (mode
/// 0600 from its creation), written, given `mode`, fsynced, renamed to `path`; then the
/// directory is fsynced so the rename survives a crash. On error `path` is untouched and
/// the temporary file is gone.
pub fn write_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
    existing: Existing,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(contents)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    match existing {
        Existing::Replace => tmp.persist(path).map_err(|e| e.error)?,
        Existing::Keep => tmp.persist_noclobber(path).map_err(|e| e.error)?,
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("dynagate-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn replaces_whole_and_leaves_no_temporary_file() {
        let dir = temp_dir("replace");
        let path = dir.join("run.json");
        write_atomic(&path, b"first\n", 0o644, Existing::Replace).unwrap();
        write_atomic(&path, b"second\n", 0o644, Existing::Replace).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let err = write_atomic(&path, b"third\n", 0o600, Existing::Keep).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"second\n");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = temp_dir("fail");
        let path = dir.join("run.json");
        write_atomic(&path, b"old\n", 0o644, Existing::Replace).unwrap();
        // A directory in the way of the rename: the write fails, the old content stays.
        let blocked = dir.join("sub");
        std::fs::create_dir_all(blocked.join("x")).unwrap();
        assert!(write_atomic(&blocked, b"new\n", 0o644, Existing::Replace).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old\n");
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
