//! One async lock per key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OwnedMutexGuard;

/// A map of async locks created on demand and dropped when nobody holds or
/// waits for them, so the map stays as small as the set of busy keys.
#[derive(Debug, Default)]
pub struct KeyLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds one key's lock; dropping it lets the next waiter in.
#[derive(Debug)]
pub struct KeyGuard {
    owner: Arc<KeyLocks>,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyLocks {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Waits for `key`'s lock. Waiters are served in arrival order.
    pub async fn lock(self: &Arc<Self>, key: &str) -> KeyGuard {
        let lock = Arc::clone(
            self.locks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(key.to_owned())
                .or_default(),
        );
        KeyGuard {
            owner: Arc::clone(self),
            key: key.to_owned(),
            guard: Some(lock.lock_owned().await),
        }
    }

    /// [`KeyLocks::lock`] for blocking code (a `spawn_blocking` task or a
    /// plain thread; never on an async runtime thread, where it panics).
    pub fn lock_blocking(self: &Arc<Self>, key: &str) -> KeyGuard {
        let lock = Arc::clone(
            self.locks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(key.to_owned())
                .or_default(),
        );
        KeyGuard {
            owner: Arc::clone(self),
            key: key.to_owned(),
            guard: Some(lock.blocking_lock_owned()),
        }
    }

    /// How many keys currently have a lock entry (held or awaited).
    pub fn len(&self) -> usize {
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl KeyGuard {
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self
            .owner
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Only this map and nobody else holds the entry: no holder, no waiter.
        if locks
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_holder_per_key_and_entries_go_away() {
        let locks = KeyLocks::new();
        let first = locks.lock("a").await;
        let other_key = locks.lock("b").await;
        assert_eq!(locks.len(), 2);

        let waiting = {
            let locks = Arc::clone(&locks);
            tokio::spawn(async move { locks.lock("a").await.key().to_owned() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the second locker must wait");
        drop(first);
        assert_eq!(waiting.await.expect("join"), "a");
        drop(other_key);
        assert!(locks.is_empty(), "unused entries are removed");
    }

    #[test]
    fn blocking_lockers_exclude_each_other_and_clean_up() {
        let locks = KeyLocks::new();
        let inside = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let locks = Arc::clone(&locks);
                let inside = Arc::clone(&inside);
                std::thread::spawn(move || {
                    let _g = locks.lock_blocking("image");
                    let now = inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    assert_eq!(now, 0, "two holders of one key at once");
                    std::thread::sleep(Duration::from_millis(5));
                    inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        assert!(locks.is_empty());
    }

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order() {
        let locks = KeyLocks::new();
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = locks.lock("k").await;
        let mut tasks = Vec::new();
        for i in 0..5 {
            let locks = Arc::clone(&locks);
            let order = Arc::clone(&order);
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock("k").await;
                order.lock().unwrap_or_else(PoisonError::into_inner).push(i);
            }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(held);
        for t in tasks {
            t.await.expect("join");
        }
        assert_eq!(
            *order.lock().unwrap_or_else(PoisonError::into_inner),
            vec![0, 1, 2, 3, 4]
        );
        assert!(locks.is_empty());
    }
}
