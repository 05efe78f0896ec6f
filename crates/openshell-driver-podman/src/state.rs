//! The driver's own state, one directory per sandbox under `state_dir`:
//!
//! - `stopped`: the sandbox was stopped through StopSandbox (so it reports
//!   `Suspended=True`, which Podman alone cannot tell from a crash);
//! - `token`: the sandbox token, bind-mounted read-only into the container;
//! - `start-failure`: why the last StartSandbox failed, shown as the
//!   sandbox's condition until a start succeeds.
//!
//! Everything survives a driver restart; sandbox ids are validated before
//! they become path components.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::spec::check_sandbox_id;

/// Why the last start of a sandbox failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartFailure {
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Creates (or checks) the private state directory.
    pub fn open(root: &Path) -> Result<Self> {
        driver_lifecycle::socket::prepare_private_dir(root)?;
        let sandboxes = root.join("sandboxes");
        fs::create_dir_all(&sandboxes).map_err(|e| Error::io("create directory", &sandboxes, e))?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn sandbox_dir(&self, id: &str) -> Result<PathBuf> {
        check_sandbox_id(id)?;
        Ok(self.root.join("sandboxes").join(id))
    }

    fn file(&self, id: &str, name: &str) -> Result<PathBuf> {
        Ok(self.sandbox_dir(id)?.join(name))
    }

    /// Writes `contents` to `path` atomically with mode 0600.
    fn write(&self, id: &str, name: &str, contents: &[u8]) -> Result<PathBuf> {
        let dir = self.sandbox_dir(id)?;
        fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::io("create", &tmp, e))?;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io("set mode 0600 on", &tmp, e))?;
        file.write_all(contents)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io("write", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| Error::io("rename into place", &path, e))?;
        Ok(path)
    }

    fn remove(&self, id: &str, name: &str) -> Result<()> {
        let path = self.file(id, name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &path, e)),
        }
    }

    /// Records that the sandbox was stopped on request.
    pub fn mark_stopped(&self, id: &str) -> Result<()> {
        self.write(id, "stopped", b"stopped through StopSandbox\n")
            .map(drop)
    }

    pub fn clear_stopped(&self, id: &str) -> Result<()> {
        self.remove(id, "stopped")
    }

    pub fn is_stopped(&self, id: &str) -> bool {
        self.file(id, "stopped").is_ok_and(|p| p.exists())
    }

    /// Stores the sandbox token and returns the file to mount.
    pub fn write_token(&self, id: &str, token: &str) -> Result<PathBuf> {
        self.write(id, "token", token.as_bytes())
    }

    pub fn record_start_failure(&self, id: &str, failure: &StartFailure) -> Result<()> {
        let text = serde_json::to_vec(failure).map_err(|e| Error::Protocol {
            action: "record a start failure".to_owned(),
            reason: e.to_string(),
        })?;
        self.write(id, "start-failure", &text).map(drop)
    }

    pub fn clear_start_failure(&self, id: &str) -> Result<()> {
        self.remove(id, "start-failure")
    }

    pub fn start_failure(&self, id: &str) -> Option<StartFailure> {
        let path = self.file(id, "start-failure").ok()?;
        let text = fs::read(path).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Removes everything kept for the sandbox.
    pub fn forget(&self, id: &str) -> Result<()> {
        let dir = self.sandbox_dir(id)?;
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &dir, e)),
        }
    }

    /// Ids that have state here.
    pub fn known_ids(&self) -> Vec<String> {
        fs::read_dir(self.root.join("sandboxes"))
            .map(|entries| {
                entries
                    .filter_map(std::result::Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|name| check_sandbox_id(name).is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn markers_tokens_and_failures_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("state")).unwrap();
        let meta = fs::metadata(state.root()).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);

        assert!(!state.is_stopped("s1"));
        state.mark_stopped("s1").unwrap();
        assert!(state.is_stopped("s1"));
        state.clear_stopped("s1").unwrap();
        state.clear_stopped("s1").unwrap();
        assert!(!state.is_stopped("s1"));

        let token = state.write_token("s1", "secret").unwrap();
        assert_eq!(fs::read_to_string(&token).unwrap(), "secret");
        assert_eq!(fs::metadata(&token).unwrap().mode() & 0o777, 0o600);

        let failure = StartFailure {
            reason: "ImageMissing".into(),
            message: "gone".into(),
        };
        state.record_start_failure("s1", &failure).unwrap();
        assert_eq!(state.start_failure("s1"), Some(failure));
        assert_eq!(state.known_ids(), vec!["s1".to_owned()]);

        state.forget("s1").unwrap();
        state.forget("s1").unwrap();
        assert!(state.start_failure("s1").is_none());
        assert!(state.known_ids().is_empty());
    }

    #[test]
    fn ids_cannot_escape_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("state")).unwrap();
        assert!(state.mark_stopped("../evil").is_err());
        assert!(state.mark_stopped(".hidden").is_err());
        assert!(!state.is_stopped("../evil"));
    }
}
