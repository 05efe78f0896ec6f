//! A sandbox's console log: the guest output the driver receives from the
//! VMM's console pipe, appended to `console.log` across boots (rotated to
//! `console.log.1` past a size), fanned out to log followers, and kept as a
//! short in-memory tail of the current boot for error reports.

use std::collections::VecDeque;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::broadcast;

use crate::error::{Error, Result};

/// Bytes of the current boot's output kept in memory for error reports.
const BOOT_TAIL_BYTES: usize = 16 << 10;

/// What followers receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveOutput {
    /// Console bytes and when they were read (ms since the Unix epoch).
    Chunk { data: Vec<u8>, at_ms: i64 },
    /// The boot ended; followers stop.
    End,
}

struct Inner {
    file: Option<std::fs::File>,
    size: u64,
    boot_tail: VecDeque<u8>,
    /// A boot is being prepared or running: followers keep following.
    active: bool,
}

/// One sandbox's console log.
pub struct ConsoleLog {
    path: PathBuf,
    rotated: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
    live: broadcast::Sender<LiveOutput>,
}

/// What a log reader gets: the retained output, and whether (and from
/// where) to follow.
pub struct Subscription {
    pub history: Vec<u8>,
    pub live: Option<broadcast::Receiver<LiveOutput>>,
}

impl ConsoleLog {
    pub fn new(path: PathBuf, rotated: PathBuf, max_bytes: u64) -> Self {
        let (live, _) = broadcast::channel(256);
        Self {
            path,
            rotated,
            max_bytes,
            inner: Mutex::new(Inner {
                file: None,
                size: 0,
                boot_tail: VecDeque::new(),
                active: false,
            }),
            live,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A boot starts: followers attached from now on follow it, and the
    /// in-memory tail starts empty.
    pub fn begin_boot(&self) {
        let mut inner = self.lock();
        inner.active = true;
        inner.boot_tail.clear();
    }

    /// The boot ended: followers are told to stop.
    pub fn end_boot(&self) {
        let mut inner = self.lock();
        inner.active = false;
        inner.file = None;
        let _ = self.live.send(LiveOutput::End);
    }

    /// Appends guest output.
    pub fn append(&self, data: &[u8], at_ms: i64) -> Result<()> {
        let mut inner = self.lock();
        inner.boot_tail.extend(data);
        let excess = inner.boot_tail.len().saturating_sub(BOOT_TAIL_BYTES);
        inner.boot_tail.drain(..excess);
        if inner.size >= self.max_bytes {
            inner.file = None;
            match std::fs::rename(&self.path, &self.rotated) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("rotate", &self.path, e)),
            }
        }
        if inner.file.is_none() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)
                .map_err(|e| Error::io("open", &self.path, e))?;
            inner.size = file.metadata().map(|m| m.len()).unwrap_or(0);
            inner.file = Some(file);
        }
        if let Some(file) = inner.file.as_mut() {
            file.write_all(data)
                .map_err(|e| Error::io("append to", &self.path, e))?;
        }
        inner.size = inner.size.saturating_add(data.len() as u64);
        let _ = self.live.send(LiveOutput::Chunk {
            data: data.to_vec(),
            at_ms,
        });
        Ok(())
    }

    /// The last `lines` lines of the current boot's output.
    pub fn boot_tail(&self, lines: usize) -> String {
        let inner = self.lock();
        let bytes: Vec<u8> = inner.boot_tail.iter().copied().collect();
        drop(inner);
        last_lines(&String::from_utf8_lossy(&bytes), lines)
    }

    /// Retained output (the last `tail_lines` lines, or all of it for 0)
    /// and, when `follow` is set and a boot is active, a receiver for what
    /// comes next: taken under one lock, so nothing is lost or repeated
    /// between the two.
    pub fn subscribe(&self, tail_lines: u32, follow: bool) -> Result<Subscription> {
        let inner = self.lock();
        let mut history = Vec::new();
        for path in [&self.rotated, &self.path] {
            match std::fs::read(path) {
                Ok(bytes) => history.extend(bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("read", path, e)),
            }
        }
        let live = (follow && inner.active).then(|| self.live.subscribe());
        drop(inner);
        if tail_lines > 0 {
            history = tail_bytes(&history, tail_lines as usize).to_vec();
        }
        Ok(Subscription { history, live })
    }
}

/// The last `lines` lines of `text`, joined by newlines.
pub fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The suffix of `bytes` holding its last `lines` lines (a final line
/// without a newline counts).
pub fn tail_bytes(bytes: &[u8], lines: usize) -> &[u8] {
    if lines == 0 {
        return &bytes[bytes.len()..];
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == lines {
                return &bytes[i + 1..];
            }
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn tails() {
        assert_eq!(tail_bytes(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail_bytes(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(tail_bytes(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail_bytes(b"a\nb\n", 0), b"");
        assert_eq!(last_lines("1\n2\n3", 2), "2\n3");
    }

    fn log(dir: &Path, max: u64) -> ConsoleLog {
        ConsoleLog::new(dir.join("console.log"), dir.join("console.log.1"), max)
    }

    #[test]
    fn appends_across_boots_and_rotates() {
        let tmp = tempfile::tempdir().unwrap();
        let console = log(tmp.path(), 10);
        console.begin_boot();
        console.append(b"first\n", 1).unwrap();
        console.end_boot();
        console.begin_boot();
        assert_eq!(console.boot_tail(5), "", "each boot starts a fresh tail");
        console.append(b"second\n", 2).unwrap();
        assert_eq!(console.boot_tail(5), "second");
        console.append(b"third\n", 3).unwrap();
        let all = console.subscribe(0, false).unwrap().history;
        assert_eq!(all, b"first\nsecond\nthird\n");
        assert_eq!(
            std::fs::read(tmp.path().join("console.log.1")).unwrap(),
            b"first\nsecond\n"
        );
        let tail = console.subscribe(1, false).unwrap().history;
        assert_eq!(tail, b"third\n");
    }

    #[tokio::test]
    async fn followers_get_what_follows_and_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let console = log(tmp.path(), 1 << 20);
        let idle = console.subscribe(0, true).unwrap();
        assert!(idle.live.is_none(), "nothing to follow without a boot");

        console.begin_boot();
        console.append(b"before\n", 1).unwrap();
        let mut sub = console.subscribe(0, true).unwrap();
        assert_eq!(sub.history, b"before\n");
        console.append(b"after\n", 2).unwrap();
        console.end_boot();
        let live = sub.live.as_mut().unwrap();
        assert_eq!(
            live.recv().await.unwrap(),
            LiveOutput::Chunk {
                data: b"after\n".to_vec(),
                at_ms: 2
            }
        );
        assert_eq!(live.recv().await.unwrap(), LiveOutput::End);
    }
}
