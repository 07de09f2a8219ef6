//! A counting global allocator: live heap bytes for the whole process and net bytes per thread, so a
//! load running on its own thread can be measured exactly, whatever other threads allocate meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// Wraps the system allocator and counts. Install it in a binary with
/// `#[global_allocator] static ALLOC: ultd::alloc::Counting = ultd::alloc::Counting;`.
#[derive(Debug)]
pub struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static THREAD_NET: Cell<i64> = const { Cell::new(0) };
}

fn count(delta: i64) {
    LIVE.fetch_add(delta, Ordering::Relaxed);
    // `try_with` because the allocator runs during thread teardown too.
    let _ = THREAD_NET.try_with(|c| c.set(c.get() + delta));
}

// SAFETY: every method forwards to `System` with the same arguments and only adds bookkeeping that
// neither allocates nor panics.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above; `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

/// True when the running binary installed [`Counting`].
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Live heap bytes in the process.
pub fn live_bytes() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

/// Net bytes the current thread allocated and did not free, since it started.
pub fn thread_net_bytes() -> i64 {
    THREAD_NET.try_with(Cell::get).unwrap_or(0)
}
