//! What the gateway remembers: sandbox rows in SQLite ([`store`]), in a
//! state directory that is checked before anything is written there.
//!
//! The checks are those of the run directory
//! (`driver_lifecycle::socket::prepare_private_dir`), adapted to a directory
//! that may be shared read-only: the directory must be ours and writable by
//! no one else, never a symlink; the files in it (`gateway.lock`,
//! `gateway.db`) are opened without following symlinks and must be regular
//! files we own. A root gateway therefore never creates or truncates a file
//! elsewhere because someone planted a link.

pub mod store;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

use crate::error::{Error, Result};

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Creates the state directory (0700 when new) and checks it: a real
/// directory, owned by this user, not writable by group or others.
pub fn prepare_state_dir(dir: &Path) -> Result<()> {
    if fs::symlink_metadata(dir).is_err() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| Error::io("create the state directory", dir, e))?;
    }
    let meta = fs::symlink_metadata(dir).map_err(|e| Error::io("inspect", dir, e))?;
    if meta.file_type().is_symlink() {
        return Err(Error::Config(format!(
            "state directory {} is a symlink; give the real directory with --state-dir \
             (a link could point the gateway's database anywhere)",
            dir.display()
        )));
    }
    if !meta.is_dir() {
        return Err(Error::Config(format!(
            "state directory {} is not a directory; remove it or choose another --state-dir",
            dir.display()
        )));
    }
    if meta.uid() != euid() {
        return Err(Error::Config(format!(
            "state directory {} is owned by uid {}, not by this process (uid {}); \
             chown it, or choose another --state-dir",
            dir.display(),
            meta.uid(),
            euid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(Error::Config(format!(
            "state directory {} has mode {mode:o}: other users could replace the gateway's \
             database or lock; run `chmod 700 {}` or choose another --state-dir",
            dir.display(),
            dir.display()
        )));
    }
    if mode & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), "the state directory is readable by other users; sandbox specs (including env) are stored there");
    }
    Ok(())
}

/// Opens (creating 0600 when absent) a file in the state directory without
/// following a symlink, and checks that it is a regular file this user owns
/// and that only this user can read (tightening the mode if needed).
pub fn open_private_file(path: &Path, what: &str) -> Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_CLOEXEC.bits())
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) {
                Error::Config(format!(
                    "{what} {} is a symlink; refusing to follow it. Remove the link \
                     (the gateway creates the file itself)",
                    path.display()
                ))
            } else {
                Error::io("open", path, e)
            }
        })?;
    let meta = file.metadata().map_err(|e| Error::io("inspect", path, e))?;
    if !meta.file_type().is_file() {
        return Err(Error::Config(format!(
            "{what} {} is not a regular file; remove it",
            path.display()
        )));
    }
    if meta.uid() != euid() {
        return Err(Error::Config(format!(
            "{what} {} is owned by uid {}, not by this process (uid {}); remove it or chown it",
            path.display(),
            meta.uid(),
            euid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| Error::io("set mode 0600 on", path, e))?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn writable_or_symlinked_state_dirs_are_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let open = root.path().join("open");
        fs::create_dir(&open).expect("mkdir");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
        let error = prepare_state_dir(&open).expect_err("0777").to_string();
        assert!(
            error.contains("mode 777") && error.contains("chmod 700"),
            "{error}"
        );
        let group = root.path().join("group");
        fs::create_dir(&group).expect("mkdir");
        fs::set_permissions(&group, fs::Permissions::from_mode(0o770)).expect("chmod");
        assert!(prepare_state_dir(&group).is_err());
        let link = root.path().join("link");
        std::os::unix::fs::symlink(root.path().join("fresh"), &link).expect("symlink");
        let error = prepare_state_dir(&link).expect_err("symlink").to_string();
        assert!(error.contains("is a symlink"), "{error}");
        assert!(!root.path().join("fresh").exists());
        let fresh = root.path().join("a/b");
        prepare_state_dir(&fresh).expect("created");
        assert_eq!(
            fs::metadata(&fresh).expect("stat").permissions().mode() & 0o777,
            0o700
        );
        // Readable by others: allowed (with a warning).
        fs::set_permissions(&fresh, fs::Permissions::from_mode(0o755)).expect("chmod");
        prepare_state_dir(&fresh).expect("0755 is not writable by others");
    }

    #[test]
    fn symlinked_files_are_not_followed() {
        let root = tempfile::tempdir().expect("tempdir");
        let target = root.path().join("elsewhere");
        let link = root.path().join("gateway.lock");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let error = open_private_file(&link, "lock file")
            .expect_err("dangling link")
            .to_string();
        assert!(error.contains("is a symlink"), "{error}");
        assert!(!target.exists(), "the link target was created");
        let plain = root.path().join("gateway.db");
        fs::write(&plain, b"").expect("write");
        fs::set_permissions(&plain, fs::Permissions::from_mode(0o644)).expect("chmod");
        open_private_file(&plain, "database").expect("regular file");
        assert_eq!(
            fs::metadata(&plain).expect("stat").permissions().mode() & 0o777,
            0o600
        );
    }
}
