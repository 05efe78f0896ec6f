//! Giving freed heap memory back to the system.
//!
//! glibc keeps what a burst of short-lived allocations freed for reuse
//! instead of returning it: after 1000 watches closed, the gateway stayed
//! at 80–133 MiB where it had been 35 MiB before them, and a trim brought
//! it back to 45–50 MiB (`benches/watches.rs`). The gateway trims after
//! watches close ([`crate::gateway::watch`]); this is the one call that
//! needs `unsafe` for it.
#![expect(
    unsafe_code,
    reason = "the malloc_trim seam: one libc call with a SAFETY comment"
)]

/// Returns free heap memory to the system where the C library keeps it
/// (glibc); elsewhere does nothing. True when memory was released. Walks
/// every malloc arena, so call it off the async runtime
/// (`spawn_blocking`) and not in a loop.
#[must_use]
pub fn release_free_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers; it only returns free
        // pages of the allocator's own arenas to the kernel, under the
        // allocator's locks, so it is safe to call from any thread at any
        // time.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Freed memory the allocator kept is released: a large heap built of
    /// small blocks, all freed, leaves free pages for the trim to return.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_freed_heap_is_released() {
        let blocks: Vec<Vec<u8>> = (0..20_000u32)
            .map(|i| vec![i.to_le_bytes()[0]; 1000])
            .collect();
        // Keep one late block so the freed ones are not simply the top of
        // the heap, which free() itself would give back.
        let keep = vec![1u8; 1000];
        drop(blocks);
        assert!(release_free_heap(), "malloc_trim released nothing");
        assert_eq!(keep[0], 1);
    }
}
