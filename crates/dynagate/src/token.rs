//! The admin token: generated at first start from the OS's secure random source and kept
//! in `<data-dir>/admin.token` (mode 0600). There is no built-in default.

use crate::files::{write_atomic, Existing};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const TOKEN_FILE: &str = "admin.token";

pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_FILE)
}

/// 32 random bytes as 64 hex characters.
pub fn generate() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("secure random source failed: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads the token file, creating it with a new token if it does not exist.
/// Returns the token and whether it was created now.
pub fn load_or_create(data_dir: &Path) -> Result<(String, bool), String> {
    let path = token_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.trim().to_string();
            if token.len() < 16 {
                return Err(format!(
                    "{}: token is shorter than 16 characters",
                    path.display()
                ));
            }
            let mode = std::fs::metadata(&path)
                .map(|m| m.permissions().mode() & 0o077)
                .unwrap_or(0);
            if mode != 0 {
                tracing::warn!(path = %path.display(), "admin token file is readable by others; chmod 600 it");
            }
            Ok((token, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = generate()?;
            // Written whole or not at all: an empty token file would stop every later start.
            match write_atomic(&path, format!("{token}\n").as_bytes(), 0o600, Existing::Keep) {
                Ok(()) => Ok((token, true)),
                // Another process created it meanwhile: use that one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    load_or_create(data_dir)
                }
                Err(e) => Err(format!(
                    "{}: cannot write a new admin token: {e} (free space in the data directory, or set DYNAGATE_ADMIN_TOKEN)",
                    path.display()
                )),
            }
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}
