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
//!
//! The markers are read from disk once, when the driver starts, and kept in
//! memory: observing a sandbox (which happens for every Podman event and
//! every container of a full list) asks memory only. Changes are written
//! through to disk first, on the blocking pool, and reach memory once they
//! are durable.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::spec::check_sandbox_id;

const STOPPED: &str = "stopped";
const TOKEN: &str = "token";
const START_FAILURE: &str = "start-failure";

/// Why the last start of a sandbox failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartFailure {
    pub reason: String,
    pub message: String,
}

/// What the markers of one sandbox say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Marks {
    stopped: bool,
    start_failure: Option<StartFailure>,
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
    /// Every sandbox with a directory here, and its markers.
    marks: Arc<Mutex<BTreeMap<String, Marks>>>,
}

/// Runs file work on the blocking pool.
async fn blocking<T, F>(work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Internal(format!("a state file task failed: {e}")))?
}

/// Writes `contents` to `dir/name` atomically with mode 0600, durably.
fn write_file(dir: &Path, name: &str, contents: &[u8]) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
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

fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// The markers found in one sandbox's directory.
fn read_marks(dir: &Path) -> Marks {
    let start_failure = match fs::read(dir.join(START_FAILURE)) {
        Ok(text) => serde_json::from_slice(&text)
            .inspect_err(|error| {
                tracing::warn!(dir = %dir.display(), error = %error, "ignoring an unreadable start-failure record");
            })
            .ok(),
        Err(_) => None,
    };
    Marks {
        stopped: dir.join(STOPPED).exists(),
        start_failure,
    }
}

impl StateDir {
    /// Creates (or checks) the private state directory and reads every
    /// sandbox's markers. Blocks: call it at startup, or use [`Self::load`].
    pub fn open(root: &Path) -> Result<Self> {
        driver_lifecycle::socket::prepare_private_dir(root)?;
        let sandboxes = root.join("sandboxes");
        fs::create_dir_all(&sandboxes).map_err(|e| Error::io("create directory", &sandboxes, e))?;
        let entries =
            fs::read_dir(&sandboxes).map_err(|e| Error::io("read directory", &sandboxes, e))?;
        let marks = entries
            .filter_map(std::result::Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| check_sandbox_id(name).is_ok())
            .map(|id| {
                let marks = read_marks(&sandboxes.join(&id));
                (id, marks)
            })
            .collect();
        Ok(Self {
            root: root.to_owned(),
            marks: Arc::new(Mutex::new(marks)),
        })
    }

    /// [`Self::open`] on the blocking pool.
    pub async fn load(root: &Path) -> Result<Self> {
        let root = root.to_owned();
        blocking(move || Self::open(&root)).await
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn marks(&self) -> MutexGuard<'_, BTreeMap<String, Marks>> {
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sandbox_dir(&self, id: &str) -> Result<PathBuf> {
        check_sandbox_id(id)?;
        Ok(self.root.join("sandboxes").join(id))
    }

    /// Writes one file of sandbox `id` durably, then applies `change` to
    /// its markers in memory.
    async fn write(
        &self,
        id: &str,
        name: &'static str,
        contents: Vec<u8>,
        change: impl FnOnce(&mut Marks),
    ) -> Result<PathBuf> {
        let dir = self.sandbox_dir(id)?;
        let path = blocking(move || write_file(&dir, name, &contents)).await?;
        change(self.marks().entry(id.to_owned()).or_default());
        Ok(path)
    }

    /// Removes one file of sandbox `id`, then applies `change` to its
    /// markers in memory.
    async fn remove(
        &self,
        id: &str,
        name: &'static str,
        change: impl FnOnce(&mut Marks),
    ) -> Result<()> {
        let path = self.sandbox_dir(id)?.join(name);
        blocking(move || remove_file(&path)).await?;
        if let Some(marks) = self.marks().get_mut(id) {
            change(marks);
        }
        Ok(())
    }

    /// Records that the sandbox was stopped on request.
    pub async fn mark_stopped(&self, id: &str) -> Result<()> {
        self.write(
            id,
            STOPPED,
            b"stopped through StopSandbox\n".to_vec(),
            |m| {
                m.stopped = true;
            },
        )
        .await
        .map(drop)
    }

    pub async fn clear_stopped(&self, id: &str) -> Result<()> {
        self.remove(id, STOPPED, |m| m.stopped = false).await
    }

    /// Whether the sandbox was stopped on request (memory only).
    pub fn is_stopped(&self, id: &str) -> bool {
        self.marks().get(id).is_some_and(|m| m.stopped)
    }

    /// Stores the sandbox token and returns the file to mount.
    pub async fn write_token(&self, id: &str, token: &str) -> Result<PathBuf> {
        self.write(id, TOKEN, token.as_bytes().to_vec(), |_| {})
            .await
    }

    pub async fn record_start_failure(&self, id: &str, failure: &StartFailure) -> Result<()> {
        let text = serde_json::to_vec(failure).map_err(|e| Error::Protocol {
            action: "record a start failure".to_owned(),
            reason: e.to_string(),
        })?;
        let failure = failure.clone();
        self.write(id, START_FAILURE, text, |m| m.start_failure = Some(failure))
            .await
            .map(drop)
    }

    pub async fn clear_start_failure(&self, id: &str) -> Result<()> {
        self.remove(id, START_FAILURE, |m| m.start_failure = None)
            .await
    }

    /// Why the last start failed, until a start succeeds (memory only).
    pub fn start_failure(&self, id: &str) -> Option<StartFailure> {
        self.marks().get(id)?.start_failure.clone()
    }

    /// Removes everything kept for the sandbox.
    pub async fn forget(&self, id: &str) -> Result<()> {
        let dir = self.sandbox_dir(id)?;
        blocking(move || match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &dir, e)),
        })
        .await?;
        self.marks().remove(id);
        Ok(())
    }

    /// Ids that have state here.
    pub fn known_ids(&self) -> Vec<String> {
        self.marks().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn failure() -> StartFailure {
        StartFailure {
            reason: "ImageMissing".into(),
            message: "gone".into(),
        }
    }

    #[tokio::test]
    async fn markers_tokens_and_failures_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::load(&dir.path().join("state")).await.unwrap();
        let meta = fs::metadata(state.root()).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);

        assert!(!state.is_stopped("s1"));
        state.mark_stopped("s1").await.unwrap();
        assert!(state.is_stopped("s1"));
        state.clear_stopped("s1").await.unwrap();
        state.clear_stopped("s1").await.unwrap();
        assert!(!state.is_stopped("s1"));

        let token = state.write_token("s1", "secret").await.unwrap();
        assert_eq!(fs::read_to_string(&token).unwrap(), "secret");
        assert_eq!(fs::metadata(&token).unwrap().mode() & 0o777, 0o600);

        state.record_start_failure("s1", &failure()).await.unwrap();
        assert_eq!(state.start_failure("s1"), Some(failure()));
        assert_eq!(state.known_ids(), vec!["s1".to_owned()]);

        state.forget("s1").await.unwrap();
        state.forget("s1").await.unwrap();
        assert!(state.start_failure("s1").is_none());
        assert!(state.known_ids().is_empty());
        assert!(!dir.path().join("state/sandboxes/s1").exists());
    }

    #[tokio::test]
    async fn markers_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("state");
        let state = StateDir::load(&root).await.unwrap();
        state.mark_stopped("s1").await.unwrap();
        state.record_start_failure("s2", &failure()).await.unwrap();
        state.write_token("s3", "t").await.unwrap();
        state.mark_stopped("s4").await.unwrap();
        state.clear_stopped("s4").await.unwrap();
        drop(state);

        let again = StateDir::load(&root).await.unwrap();
        assert!(again.is_stopped("s1"));
        assert!(again.start_failure("s1").is_none());
        assert!(!again.is_stopped("s2"));
        assert_eq!(again.start_failure("s2"), Some(failure()));
        assert!(!again.is_stopped("s3") && !again.is_stopped("s4"));
        assert_eq!(again.known_ids(), ["s1", "s2", "s3", "s4"]);
    }

    #[tokio::test]
    async fn lookups_do_not_touch_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("state");
        let state = StateDir::load(&root).await.unwrap();
        state.mark_stopped("s1").await.unwrap();
        state.record_start_failure("s1", &failure()).await.unwrap();
        let state = StateDir::load(&root).await.unwrap();
        // With the files gone, only what was loaded can answer.
        fs::remove_dir_all(&root).unwrap();
        assert!(state.is_stopped("s1"));
        assert_eq!(state.start_failure("s1"), Some(failure()));
        assert!(!state.is_stopped("s2"));
    }

    #[tokio::test]
    async fn a_failed_write_changes_nothing_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("state");
        let state = StateDir::load(&root).await.unwrap();
        // A file where the sandbox's directory should be.
        fs::write(root.join("sandboxes/s1"), b"").unwrap();
        assert!(state.mark_stopped("s1").await.is_err());
        assert!(!state.is_stopped("s1"));
    }

    #[tokio::test]
    async fn ids_cannot_escape_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::load(&dir.path().join("state")).await.unwrap();
        assert!(state.mark_stopped("../evil").await.is_err());
        assert!(state.mark_stopped(".hidden").await.is_err());
        assert!(!state.is_stopped("../evil"));
    }

    #[test]
    fn unreadable_failure_records_are_ignored_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("state");
        fs::create_dir_all(root.join("sandboxes/s1")).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(root.join("sandboxes/s1/start-failure"), b"not json").unwrap();
        let state = StateDir::open(&root).unwrap();
        assert!(state.start_failure("s1").is_none());
        assert_eq!(state.known_ids(), ["s1"]);
    }
}
