//! The few system calls that need `unsafe`: turning raw descriptors into
//! owned ones, `pidfd_open` and `close_range`. Everything else goes through
//! nix or std.
#![expect(
    unsafe_code,
    reason = "the pidfd and inherited-fd syscall seam: every unsafe block here has a SAFETY comment"
)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Duplicates `fd` onto a new descriptor numbered 3 or above that is *not*
/// close-on-exec, so a child spawned right after inherits it.
pub(crate) fn dup_inheritable(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD only reads the integer argument; `fd` is a live
    // descriptor for the duration of the call because it is borrowed.
    let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD, 3) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just returned by fcntl and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Takes ownership of a descriptor number handed to this process by its
/// parent (the ready fd), after checking it is open.
pub(crate) fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors 0-2 are stdio, not a ready fd",
        ));
    }
    // SAFETY: F_GETFD has no side effects; it only reports whether `fd` is open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked above) and was inherited across
    // exec for this purpose; nothing else in this process claims it, and the
    // caller adopts it exactly once at startup.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(io::Error::from)?;
    Ok(owned)
}

/// Opens a pidfd for `pid`. It becomes readable when that process exits.
///
/// The pid must not be recycled while this runs: use it for an unreaped
/// child of ours, or re-check afterwards that the process is still the one
/// meant (as the parent watcher does with `getppid`).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new
    // descriptor or -1; it touches no memory of ours.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw = RawFd::try_from(raw).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: `raw` is a descriptor the kernel just created for us.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Closes every descriptor from 3 upward except those in `keep`.
///
/// Meant for the first lines of a driver's `main`, before any thread or
/// runtime exists, so nothing else can be using the closed numbers.
pub(crate) fn close_fds_except(keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|fd| u32::try_from(*fd).ok())
        .filter(|fd| *fd >= 3)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 3_u32;
    for fd in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if fd > first {
            let last = if fd == u32::MAX { u32::MAX } else { fd - 1 };
            // SAFETY: close_range only closes descriptors in [first, last];
            // the caller guarantees no live object in this process owns them
            // (see the function documentation).
            let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        first = fd.saturating_add(1);
    }
    Ok(())
}

/// Makes the child spawned by `cmd` receive SIGKILL when the spawning thread's
/// process dies. Forces std's fork+exec path (no `posix_spawn`).
///
/// Linux delivers the signal when the *thread* that forked exits, so spawn
/// from a long-lived thread (a runtime worker, not a blocking-pool thread).
pub(crate) fn kill_with_parent_on_exec(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the child between fork and exec. It calls
    // only prctl and getppid, both async-signal-safe, and builds its error
    // from a raw errno without allocating.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Registers a pidfd with the tokio reactor: the result is readable once
/// the process has exited. Must be called inside a tokio runtime.
pub fn register_pidfd(pidfd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is open for its whole lifetime and always reports
    // the same descriptor from as_raw_fd; the AsyncFd takes ownership of it.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }
    .map_err(io::Error::from)
}

/// A pidfd for `pid`, registered with tokio: readable once the process has
/// exited. Same precondition as [`pidfd_open`].
pub fn exit_watch(pid: u32) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    register_pidfd(pidfd_open(pid)?)
}

/// Waits until a pidfd reports that its process exited.
pub(crate) async fn wait_pidfd(pidfd: OwnedFd) -> io::Result<()> {
    let _ready = register_pidfd(pidfd)?.readable().await?;
    Ok(())
}

/// Sets close-on-exec on every descriptor from 3 upward, so a child spawned
/// afterwards inherits nothing this process did not hand it on purpose —
/// including descriptors this process itself inherited without the flag.
pub(crate) fn mark_all_cloexec() -> io::Result<()> {
    // SAFETY: with CLOSE_RANGE_CLOEXEC the call closes nothing; it only sets
    // the close-on-exec flag, which no live object in this process relies on
    // being clear (spawns that need an inheritable descriptor create it after
    // this call while holding the spawn lock).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3_u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // Kernels before 5.11: walk /proc/self/fd instead.
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= 3)
        .collect();
    for fd in fds {
        // SAFETY: F_SETFD only changes the descriptor's flags; a descriptor
        // that closed meanwhile (the directory handle above) just fails.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pidfd_becomes_readable_when_the_child_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.05")
            .spawn()
            .unwrap();
        let watch = exit_watch(child.id()).unwrap();
        let _ready = watch.readable().await.unwrap();
        assert!(child.try_wait().unwrap().is_some());
    }

    #[test]
    fn pidfd_of_a_missing_process_fails() {
        assert!(pidfd_open(u32::MAX).is_err());
    }
}
