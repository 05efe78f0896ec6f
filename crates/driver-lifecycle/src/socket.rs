//! Socket hygiene shared by the gateway (before it spawns a driver) and by
//! drivers (before they bind): path length, a private run directory, an
//! exclusive lock next to the socket, and the rules for stale paths.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{LifecycleError, Result};

/// Longest socket path Linux accepts: `sun_path` is 108 bytes including the
/// terminating NUL.
pub const SUN_PATH_MAX: usize = 107;

/// Checks that `path` fits in `sun_path`.
pub fn check_socket_path(path: &Path) -> Result<()> {
    let len = path.as_os_str().as_bytes().len();
    if len > SUN_PATH_MAX {
        return Err(LifecycleError::SocketPathTooLong {
            path: path.to_owned(),
            len,
            max: SUN_PATH_MAX,
        });
    }
    if path.as_os_str().is_empty() {
        return Err(LifecycleError::EmptySocketPath);
    }
    Ok(())
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Makes sure `dir` is a private directory: a real directory (not a
/// symlink), owned by this process's effective uid, that no other user can
/// enter. A missing directory is created (with missing parents) mode 0700.
/// An existing one is never changed: one that others can enter is refused,
/// because it may be a shared or system directory (`/tmp`, `/run`) that
/// others rely on.
pub fn prepare_private_dir(dir: &Path) -> Result<()> {
    let existed = fs::symlink_metadata(dir).is_ok();
    if !existed {
        match fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            Ok(()) => {}
            // Lost a race with someone creating it; the checks below decide.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(LifecycleError::io("create directory", dir, e)),
        }
    }
    let meta = fs::symlink_metadata(dir).map_err(|e| LifecycleError::io("inspect", dir, e))?;
    if meta.file_type().is_symlink() {
        return Err(LifecycleError::SymlinkedDirectory {
            path: dir.to_owned(),
        });
    }
    if !meta.is_dir() {
        return Err(LifecycleError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    if meta.uid() != euid() {
        return Err(LifecycleError::DirectoryNotOwned {
            path: dir.to_owned(),
            owner: meta.uid(),
            euid: euid(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(LifecycleError::DirectoryNotPrivate {
            path: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// The run directory used when none is configured (see
/// [`openshell_wire::paths::default_run_dir`]); it is checked with
/// [`prepare_private_dir`] before use.
pub use openshell_wire::paths::default_run_dir;

/// The lock file that guards a socket path: `<socket>.lock`.
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// An exclusive `flock` on `<socket>.lock`, held for as long as this value
/// lives. Whoever holds it owns the socket path.
#[derive(Debug)]
pub struct SocketLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl SocketLock {
    /// Takes the lock without waiting; fails with
    /// [`LifecycleError::SocketLocked`] when another process holds it.
    pub fn acquire(socket: &Path) -> Result<Self> {
        let path = lock_path(socket);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| LifecycleError::io("open lock file", &path, e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Self { _lock: lock, path }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(LifecycleError::SocketLocked {
                path: socket.to_owned(),
                lock: path,
            }),
            Err((_, errno)) => Err(LifecycleError::io("lock", &path, errno.into())),
        }
    }

    /// Like [`SocketLock::acquire`], but keeps trying for up to `wait` while
    /// another process holds the lock. A process that was just killed can
    /// hold its locks for a moment after it has been reaped (the kernel may
    /// release its files asynchronously), so a successor started right away
    /// needs this grace. Blocks the calling thread: async code uses
    /// [`SocketLock::acquire_waiting_async`].
    pub fn acquire_waiting(socket: &Path, wait: std::time::Duration) -> Result<Self> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match Self::acquire(socket) {
                Err(LifecycleError::SocketLocked { .. })
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(LOCK_RETRY);
                }
                result => return result,
            }
        }
    }

    /// [`SocketLock::acquire_waiting`] for async code: waits on the timer,
    /// never on the thread, so a runtime worker stays free meanwhile.
    pub async fn acquire_waiting_async(socket: &Path, wait: std::time::Duration) -> Result<Self> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match Self::acquire(socket) {
                Err(LifecycleError::SocketLocked { .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(LOCK_RETRY).await;
                }
                result => return result,
            }
        }
    }

    /// Path of the lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What was found at a socket path before binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketPathState {
    /// Nothing was there.
    Absent,
    /// A socket with no listener was there and has been removed.
    RemovedStale,
}

/// Makes `path` free for a new listener.
///
/// Absent paths are fine. A socket owned by this uid with no live listener is
/// removed. A live listener, a socket of another uid, a symlink or any other
/// kind of file is an error naming the path; nothing is removed then.
pub fn clear_stale_socket(path: &Path) -> Result<SocketPathState> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(SocketPathState::Absent),
        Err(e) => return Err(LifecycleError::io("inspect", path, e)),
    };
    let file_type = meta.file_type();
    if !file_type.is_socket() {
        return Err(LifecycleError::NotASocket {
            path: path.to_owned(),
            kind: describe_file_type(&file_type),
        });
    }
    if meta.uid() != euid() {
        return Err(LifecycleError::SocketNotOwned {
            path: path.to_owned(),
            owner: meta.uid(),
            euid: euid(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(LifecycleError::LiveListener {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => match fs::remove_file(path) {
            Ok(()) => Ok(SocketPathState::RemovedStale),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(SocketPathState::Absent),
            Err(e) => Err(LifecycleError::io("remove stale socket", path, e)),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(SocketPathState::Absent),
        Err(e) => Err(LifecycleError::io("probe", path, e)),
    }
}

/// Removes `path` if it is still a socket. Used on teardown, after the lock
/// proved nobody else serves there.
pub(crate) fn remove_socket_if_socket(path: &Path) {
    if let Ok(meta) = fs::symlink_metadata(path)
        && meta.file_type().is_socket()
        && let Err(e) = fs::remove_file(path)
        && e.kind() != ErrorKind::NotFound
    {
        tracing::warn!(socket = %path.display(), error = %e, "could not remove driver socket");
    }
}

fn describe_file_type(file_type: &fs::FileType) -> &'static str {
    if file_type.is_symlink() {
        "symbolic link"
    } else if file_type.is_dir() {
        "directory"
    } else if file_type.is_file() {
        "regular file"
    } else if file_type.is_fifo() {
        "named pipe"
    } else if file_type.is_char_device() || file_type.is_block_device() {
        "device"
    } else {
        "special file"
    }
}

/// How often a held lock is tried again while waiting for it.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(5);

/// How long a starting server waits for a predecessor's lock to go away.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Everything a driver's listener needs before `bind`: a private parent
/// directory, a valid path length, the lock (waiting up to [`LOCK_WAIT`]
/// for a predecessor that is just going away), and no stale socket in the
/// way. The returned lock must be kept for as long as the socket is served.
pub fn prepare_socket_for_bind(socket: &Path) -> Result<SocketLock> {
    check_bind_path(socket)?;
    let lock = SocketLock::acquire_waiting(socket, LOCK_WAIT)?;
    clear_stale_socket(socket)?;
    Ok(lock)
}

/// [`prepare_socket_for_bind`] for async code: the wait for a predecessor's
/// lock does not hold a runtime thread.
pub async fn prepare_socket_for_bind_async(socket: &Path) -> Result<SocketLock> {
    check_bind_path(socket)?;
    let lock = SocketLock::acquire_waiting_async(socket, LOCK_WAIT).await?;
    clear_stale_socket(socket)?;
    Ok(lock)
}

/// The path-length and private-directory rules for a socket about to be
/// bound.
fn check_bind_path(socket: &Path) -> Result<()> {
    check_socket_path(socket)?;
    let parent = socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    prepare_private_dir(parent)
}

/// A socket file this process bound: it holds the path's lock, and on drop
/// removes the file if it is still the very file that was bound (same
/// device and inode), so a successor's socket is never unlinked.
#[derive(Debug)]
pub struct BoundSocket {
    path: PathBuf,
    identity: (u64, u64),
    _lock: SocketLock,
}

impl BoundSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.identity
        {
            remove_socket_if_socket(&self.path);
        }
    }
}

/// Binds a listener at `path` under every rule of this module (private
/// directory, length, lock, stale-socket checks) and makes the socket 0600.
/// Keep the returned [`BoundSocket`] for as long as the listener serves.
pub fn bind_unix_listener(path: &Path) -> Result<(tokio::net::UnixListener, BoundSocket)> {
    let lock = prepare_socket_for_bind(path)?;
    bind_locked(path, lock)
}

/// [`bind_unix_listener`] for async code (drivers' `serve_uds`, the
/// gateway's listener): waiting for a predecessor's lock does not block a
/// runtime thread.
pub async fn bind_unix_listener_async(
    path: &Path,
) -> Result<(tokio::net::UnixListener, BoundSocket)> {
    let lock = prepare_socket_for_bind_async(path).await?;
    bind_locked(path, lock)
}

fn bind_locked(path: &Path, lock: SocketLock) -> Result<(tokio::net::UnixListener, BoundSocket)> {
    let listener =
        tokio::net::UnixListener::bind(path).map_err(|e| LifecycleError::io("bind", path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| LifecycleError::io("set mode 0600 on", path, e))?;
    let meta = fs::symlink_metadata(path).map_err(|e| LifecycleError::io("inspect", path, e))?;
    Ok((
        listener,
        BoundSocket {
            path: path.to_owned(),
            identity: (meta.dev(), meta.ino()),
            _lock: lock,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waiting for a held lock must leave a single-threaded runtime free to
    /// run other tasks; the old thread sleep starved them.
    #[tokio::test(flavor = "current_thread")]
    async fn waiting_for_a_lock_does_not_block_the_runtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("d.sock");
        let held = SocketLock::acquire(&socket).expect("first lock");
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let ticker = {
            let ticks = std::sync::Arc::clone(&ticks);
            tokio::spawn(async move {
                loop {
                    ticks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::task::yield_now().await;
                }
            })
        };
        let result =
            SocketLock::acquire_waiting_async(&socket, std::time::Duration::from_millis(50)).await;
        assert!(
            matches!(result, Err(LifecycleError::SocketLocked { .. })),
            "{result:?}"
        );
        assert!(
            ticks.load(std::sync::atomic::Ordering::SeqCst) > 0,
            "other tasks ran while the lock was awaited"
        );

        // Released meanwhile: the waiter gets it.
        let release = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            drop(held);
        });
        SocketLock::acquire_waiting_async(&socket, std::time::Duration::from_secs(30))
            .await
            .expect("lock after release");
        release.await.expect("join");
        ticker.abort();
    }

    #[test]
    fn length_limit_counts_bytes() {
        let ok = PathBuf::from(format!("/{}", "a".repeat(SUN_PATH_MAX - 1)));
        assert!(check_socket_path(&ok).is_ok());
        let long = PathBuf::from(format!("/{}", "a".repeat(SUN_PATH_MAX)));
        let err = check_socket_path(&long).unwrap_err().to_string();
        assert!(
            err.contains("108 bytes") || err.contains("limited to 107"),
            "{err}"
        );
        assert!(err.contains("shorter"), "{err}");
    }

    #[test]
    fn lock_path_appends_suffix() {
        assert_eq!(
            lock_path(Path::new("/run/x/d.sock")),
            PathBuf::from("/run/x/d.sock.lock")
        );
    }

    #[test]
    fn missing_private_dir_is_created_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a").join("run");
        prepare_private_dir(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn existing_shared_dir_is_refused_and_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let err = prepare_private_dir(&dir).unwrap_err();
        assert!(
            matches!(err, LifecycleError::DirectoryNotPrivate { mode: 0o755, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 700"), "{err}");
        assert_eq!(
            fs::metadata(&dir).unwrap().mode() & 0o777,
            0o755,
            "mode untouched"
        );
    }

    #[test]
    fn private_dir_refuses_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("run");
        fs::write(&file, b"x").unwrap();
        let err = prepare_private_dir(&file).unwrap_err();
        assert!(matches!(err, LifecycleError::NotADirectory { .. }), "{err}");
    }

    #[test]
    fn second_lock_on_same_socket_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("d.sock");
        let _first = SocketLock::acquire(&socket).unwrap();
        let err = SocketLock::acquire(&socket).unwrap_err();
        assert!(matches!(err, LifecycleError::SocketLocked { .. }), "{err}");
        assert!(err.to_string().contains("d.sock.lock"), "{err}");
    }

    #[test]
    fn waiting_for_a_lock_still_fails_while_it_is_held() {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("d.sock");
        let held = SocketLock::acquire(&socket).unwrap();
        let err =
            SocketLock::acquire_waiting(&socket, std::time::Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, LifecycleError::SocketLocked { .. }), "{err}");
        drop(held);
        SocketLock::acquire_waiting(&socket, std::time::Duration::from_millis(30)).unwrap();
    }

    #[test]
    fn absent_path_is_fine() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            clear_stale_socket(&tmp.path().join("none.sock")).unwrap(),
            SocketPathState::Absent
        );
    }
}
