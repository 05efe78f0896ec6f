//! The state directory on disk.
//!
//! ```text
//! <state>/                      0700
//!   sandboxes/<id>/             0700, one per sandbox, named by a validated id
//!     request.pb                the CreateSandbox request (protobuf DriverSandbox, 0600; holds the token)
//!     image.json                the image pinned at create time
//!     launch.json               the VMM launch file of the current or last boot (0600)
//!     upper/ work/              overlayfs writable layer (overlay mode)
//!     rootfs/                   the guest root: overlay mount point, or a full copy (copy mode)
//!     console.log[.1]           guest console, appended across boots
//!     vmm.log                   VMM stderr: libkrun's log and the VMM's status lines
//!     passt.log                 passt's own messages (kept off the status pipe)
//!     stopped                   marker: the sandbox is stopped on purpose
//!     exit.json                 tombstone: how the last boot ended, when it ended on its own
//!   images/
//!     <key>/rootfs/ + entry.json  unpacked OCI images, one per manifest digest
//!     .registry/                OCI layout (blobs only) of images pulled from registries
//!     .lock                     shared by users of the cache, exclusive for prune
//! ```

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::SandboxId;

/// The driver's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the directories (0700) if needed.
    pub fn prepare(&self) -> Result<()> {
        for dir in [self.root.clone(), self.sandboxes_dir(), self.images_dir()] {
            create_private_dir_all(&dir)?;
        }
        Ok(())
    }

    pub fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    pub fn sandbox(&self, id: &SandboxId) -> SandboxDir {
        SandboxDir {
            id: id.clone(),
            path: self.sandboxes_dir().join(id.as_str()),
        }
    }

    /// Sandbox directories present on disk. Entries whose name is not a
    /// valid id, or that are not plain directories, are returned separately
    /// so the caller can warn about them.
    pub fn scan(&self) -> Result<(Vec<SandboxDir>, Vec<PathBuf>)> {
        let dir = self.sandboxes_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Vec::new(), Vec::new()));
            }
            Err(e) => return Err(Error::io("list", dir, e)),
        };
        let mut good = Vec::new();
        let mut skipped = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            match entry.file_name().to_str().map(SandboxId::parse) {
                Some(Ok(id)) if is_dir => good.push(self.sandbox(&id)),
                _ => skipped.push(path),
            }
        }
        good.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((good, skipped))
    }
}

/// One sandbox's directory.
#[derive(Debug, Clone)]
pub struct SandboxDir {
    pub id: SandboxId,
    path: PathBuf,
}

impl SandboxDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn request(&self) -> PathBuf {
        self.path.join("request.pb")
    }
    pub fn image(&self) -> PathBuf {
        self.path.join("image.json")
    }
    pub fn launch(&self) -> PathBuf {
        self.path.join("launch.json")
    }
    pub fn upper(&self) -> PathBuf {
        self.path.join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.path.join("work")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.path.join("rootfs")
    }
    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }
    pub fn console_log_rotated(&self) -> PathBuf {
        self.path.join("console.log.1")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.path.join("vmm.log")
    }
    pub fn stopped_marker(&self) -> PathBuf {
        self.path.join("stopped")
    }
    pub fn tombstone(&self) -> PathBuf {
        self.path.join("exit.json")
    }

    /// Creates the directory; an existing one is an error.
    pub fn create(&self) -> Result<()> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.path)
            .map_err(|e| Error::io("create sandbox directory", &self.path, e))
    }

    pub fn exists(&self) -> bool {
        self.path.is_dir()
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped_marker().exists()
    }

    pub fn set_stopped(&self, stopped: bool) -> Result<()> {
        if stopped {
            write_private(&self.stopped_marker(), b"stopped\n")
        } else {
            remove_if_exists(&self.stopped_marker())
        }
    }

    pub fn read_tombstone(&self) -> Result<Option<Tombstone>> {
        read_json_if_exists(&self.tombstone())
    }

    pub fn write_tombstone(&self, tombstone: &Tombstone) -> Result<()> {
        write_json(&self.tombstone(), tombstone)
    }

    pub fn clear_tombstone(&self) -> Result<()> {
        remove_if_exists(&self.tombstone())
    }

    /// Removes the whole directory. Refuses a symlink or a non-directory,
    /// and a directory whose `rootfs` is still a mount point.
    pub fn remove_all(&self) -> Result<()> {
        let meta = match std::fs::symlink_metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("inspect", &self.path, e)),
        };
        if !meta.is_dir() {
            return Err(Error::FailedPrecondition(format!(
                "refusing to remove {}: it is not a directory",
                self.path.display()
            )));
        }
        if crate::layer::is_mount_point(&self.rootfs()) {
            return Err(Error::FailedPrecondition(format!(
                "refusing to remove {}: {} is still mounted",
                self.path.display(),
                self.rootfs().display()
            )));
        }
        std::fs::remove_dir_all(&self.path).map_err(|e| Error::io("remove", &self.path, e))
    }
}

/// How a boot ended on its own, kept so a restarted driver reports it
/// instead of booting the sandbox again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// Condition reason: `Exited`, `BootFailed` or `ProvisioningFailed`.
    pub reason: String,
    pub message: String,
    /// Guest exit code, when the guest ran.
    pub exit_code: Option<i32>,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
}

/// Writes `bytes` to `path` with mode 0600: to a temporary file in the same
/// directory first, then renamed over, so readers never see half a file.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{unique}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("write", path, e)
    })
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::CorruptState {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    write_private(path, &bytes)
}

pub fn read_json_if_exists<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::CorruptState {
                path: path.to_owned(),
                message: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", path, e)),
    }
}

pub fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// Creates `dir` and missing parents with mode 0700; an existing directory
/// is tightened to 0700 only if it is the last component.
pub fn create_private_dir_all(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("create directory", dir, e))?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| Error::io("inspect", dir, e))?;
    if !meta.is_dir() {
        return Err(Error::FailedPrecondition(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io("set mode 0700 on", dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_built_from_the_id_only() {
        let state = StateDir::new("/s");
        let dir = state.sandbox(&SandboxId::parse("abc").unwrap());
        assert_eq!(dir.path(), Path::new("/s/sandboxes/abc"));
        assert_eq!(dir.console_log(), Path::new("/s/sandboxes/abc/console.log"));
        assert_eq!(dir.stopped_marker(), Path::new("/s/sandboxes/abc/stopped"));
        assert_eq!(dir.tombstone(), Path::new("/s/sandboxes/abc/exit.json"));
    }

    #[test]
    fn prepare_creates_private_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("a/b"));
        state.prepare().unwrap();
        for dir in [
            state.root().to_owned(),
            state.sandboxes_dir(),
            state.images_dir(),
        ] {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", dir.display());
        }
    }

    #[test]
    fn scan_separates_valid_sandboxes_from_junk() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path());
        state.prepare().unwrap();
        for id in ["b", "a"] {
            state
                .sandbox(&SandboxId::parse(id).unwrap())
                .create()
                .unwrap();
        }
        std::fs::write(state.sandboxes_dir().join("file"), b"").unwrap();
        std::fs::create_dir(state.sandboxes_dir().join("bad name")).unwrap();
        std::os::unix::fs::symlink("/", state.sandboxes_dir().join("link")).unwrap();
        let (good, skipped) = state.scan().unwrap();
        let ids: Vec<&str> = good.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(skipped.len(), 3);
    }

    #[test]
    fn markers_and_tombstones() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path());
        state.prepare().unwrap();
        let dir = state.sandbox(&SandboxId::parse("x").unwrap());
        dir.create().unwrap();
        assert!(dir.create().is_err(), "an existing directory is an error");
        assert!(!dir.is_stopped());
        dir.set_stopped(true).unwrap();
        dir.set_stopped(true).unwrap();
        assert!(dir.is_stopped());
        dir.set_stopped(false).unwrap();
        dir.set_stopped(false).unwrap();
        assert!(!dir.is_stopped());

        assert_eq!(dir.read_tombstone().unwrap(), None);
        let tomb = Tombstone {
            reason: "Exited".into(),
            message: "guest exited with code 3".into(),
            exit_code: Some(3),
            at_ms: 5,
        };
        dir.write_tombstone(&tomb).unwrap();
        assert_eq!(dir.read_tombstone().unwrap(), Some(tomb));
        std::fs::write(dir.tombstone(), b"{").unwrap();
        assert!(matches!(
            dir.read_tombstone(),
            Err(Error::CorruptState { .. })
        ));
        dir.clear_tombstone().unwrap();
        dir.remove_all().unwrap();
        assert!(!dir.exists());
        dir.remove_all().unwrap();
    }

    #[test]
    fn remove_all_refuses_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path());
        state.prepare().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::os::unix::fs::symlink(&victim, state.sandboxes_dir().join("x")).unwrap();
        let dir = state.sandbox(&SandboxId::parse("x").unwrap());
        assert!(dir.remove_all().is_err());
        assert!(victim.exists());
    }

    #[test]
    fn write_private_replaces_atomically_with_mode_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        write_private(&path, b"one").unwrap();
        write_private(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers = std::fs::read_dir(tmp.path()).unwrap().count();
        assert_eq!(leftovers, 1);
    }
}
