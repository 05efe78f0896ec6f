//! `pidfd_open`, which has no safe wrapper in nix or std, and registering
//! the pidfd with tokio.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd as _, OwnedFd, RawFd};

/// Opens a pidfd for `pid`: it becomes readable when the process exits. The
/// caller must make sure `pid` is its own unreaped child, so the pid cannot
/// name another process.
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
    // SAFETY: `raw` is a descriptor the kernel just created for this call
    // and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// A pidfd for `pid` registered with the tokio reactor: readable once the
/// process has exited. Same precondition as [`pidfd_open`].
pub fn exit_watch(pid: u32) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    let fd = pidfd_open(pid)?;
    // SAFETY: an OwnedFd is open for its whole lifetime and always reports
    // the same descriptor from as_raw_fd; the AsyncFd takes ownership of it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
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
