//! Software stand-ins for the system: a clock that tests set by hand and a fixed pool of pages.
//! Both are `no_std` and allocation-free, so the example kernel can use them too.

use core::{
    cell::UnsafeCell,
    ptr::NonNull,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use crate::{format::PAGE_SIZE, hal::Clock, hal::PageAlloc};

/// A clock that only moves when told to, so tests control every time delta.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    /// A clock reading `start`.
    pub const fn new(start: u64) -> Self {
        Self {
            now: AtomicU64::new(start),
        }
    }

    /// Moves the clock forward by `delta` and returns the new time (saturating at `u64::MAX`).
    pub fn advance(&self, delta: u64) -> u64 {
        let mut cur = self.now.load(Ordering::Relaxed);
        loop {
            let next = cur.saturating_add(delta);
            match self
                .now
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Sets the time (tests only: the ring buffer expects it not to go backwards).
    pub fn set(&self, now: u64) {
        self.now.store(now, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }
}

/// A clock that ticks by one on every read: cheap, monotonic, and never the same twice.
#[derive(Debug, Default)]
pub struct CountingClock {
    now: AtomicU64,
}

impl CountingClock {
    /// A clock whose first read returns `start`.
    pub const fn new(start: u64) -> Self {
        Self {
            now: AtomicU64::new(start),
        }
    }
}

impl Clock for CountingClock {
    fn now(&self) -> u64 {
        self.now.fetch_add(1, Ordering::Relaxed)
    }
}

/// One page-aligned page.
#[repr(C, align(4096))]
struct Page(UnsafeCell<[u8; PAGE_SIZE]>);

/// A fixed pool of `N` pages with a first-fit allocator: no heap needed. Put it in a `static`
/// (it is all zeros, so it lands in `.bss`) or a `Box`.
pub struct PagePool<const N: usize> {
    pages: [Page; N],
    used: [AtomicBool; N],
    lock: AtomicBool,
}

// SAFETY: pages are handed out to one owner at a time under `lock`.
unsafe impl<const N: usize> Sync for PagePool<N> {}

impl<const N: usize> Default for PagePool<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> PagePool<N> {
    /// An empty pool.
    pub const fn new() -> Self {
        Self {
            pages: [const { Page(UnsafeCell::new([0; PAGE_SIZE])) }; N],
            used: [const { AtomicBool::new(false) }; N],
            lock: AtomicBool::new(false),
        }
    }

    /// Pages currently allocated.
    pub fn used_pages(&self) -> usize {
        self.used
            .iter()
            .filter(|u| u.load(Ordering::Relaxed))
            .count()
    }

    fn locked<R>(&self, f: impl FnOnce() -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        let r = f();
        self.lock.store(false, Ordering::Release);
        r
    }
}

// SAFETY: runs of free pages are marked used under the lock before being handed out, zeroed,
// page-aligned (`Page` is), and only reused after `free_pages`.
unsafe impl<const N: usize> PageAlloc for PagePool<N> {
    fn alloc_pages(&self, order: u32) -> Option<NonNull<u8>> {
        let count = 1usize.checked_shl(order)?;
        let start = self.locked(|| {
            // Naturally aligned runs, like a buddy allocator.
            let mut start = 0;
            while start + count <= N {
                if self.used[start..start + count]
                    .iter()
                    .all(|u| !u.load(Ordering::Relaxed))
                {
                    for u in &self.used[start..start + count] {
                        u.store(true, Ordering::Relaxed);
                    }
                    return Some(start);
                }
                start += count;
            }
            None
        })?;
        // Derived from the whole array, not from page `start` (whose pointer would cover that
        // page only): a run of several pages must be reachable through it. Every byte is
        // inside an `UnsafeCell`, so writing through a pointer derived from `&self` is allowed.
        let p = self
            .pages
            .as_ptr()
            .wrapping_add(start)
            .cast::<u8>()
            .cast_mut();
        // SAFETY: the run `start..start + count` is ours and contiguous (`[Page; N]`).
        unsafe { p.write_bytes(0, count * PAGE_SIZE) };
        NonNull::new(p)
    }

    unsafe fn free_pages(&self, pages: NonNull<u8>, order: u32) {
        let base = self.pages.as_ptr() as usize;
        let start = (pages.as_ptr() as usize - base) / PAGE_SIZE;
        self.locked(|| {
            for u in &self.used[start..start + (1 << order)] {
                u.store(false, Ordering::Relaxed);
            }
        });
    }
}

/// An allocator that fails on demand: it forwards to `inner` while its budget of allocations
/// lasts, then returns `None` (for tests of the `NoMemory` paths).
#[derive(Debug)]
pub struct FailingAlloc<A> {
    inner: A,
    budget: AtomicU64,
}

impl<A> FailingAlloc<A> {
    /// Forwards every allocation to `inner` until [`FailingAlloc::fail_after`] is called.
    pub const fn new(inner: A) -> Self {
        Self {
            inner,
            budget: AtomicU64::new(u64::MAX),
        }
    }

    /// Lets `n` more allocations succeed, then fails every one.
    pub fn fail_after(&self, n: u64) {
        self.budget.store(n, Ordering::SeqCst);
    }

    /// Allocations succeed again.
    pub fn heal(&self) {
        self.budget.store(u64::MAX, Ordering::SeqCst);
    }

    /// The allocator it forwards to.
    pub fn inner(&self) -> &A {
        &self.inner
    }
}

// SAFETY: forwards to `inner`, which upholds the contract, or returns `None`.
unsafe impl<A: PageAlloc> PageAlloc for FailingAlloc<A> {
    fn alloc_pages(&self, order: u32) -> Option<NonNull<u8>> {
        self.budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .ok()?;
        self.inner.alloc_pages(order)
    }

    unsafe fn free_pages(&self, pages: NonNull<u8>, order: u32) {
        // SAFETY: the pages came from `inner` (we only hand out its pages).
        unsafe { self.inner.free_pages(pages, order) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of several pages is one writable block (under Miri: the pointer's provenance
    /// covers the whole run, not only its first page).
    #[test]
    fn a_multi_page_run_is_writable_end_to_end() {
        extern crate std;
        let pool = std::boxed::Box::new(PagePool::<4>::new());
        let first = pool.alloc_pages(0).unwrap();
        let run = pool.alloc_pages(1).unwrap();
        // SAFETY: `run` is 2 pages we own; `first` one page, disjoint from it.
        unsafe {
            run.as_ptr().write_bytes(0xa5, 2 * PAGE_SIZE);
            assert_eq!(*run.as_ptr().add(2 * PAGE_SIZE - 1), 0xa5);
            assert_eq!(*first.as_ptr(), 0, "the run overlapped the first page");
            pool.free_pages(run, 1);
            pool.free_pages(first, 0);
        }
        assert!(pool.alloc_pages(2).is_some());
    }
}
