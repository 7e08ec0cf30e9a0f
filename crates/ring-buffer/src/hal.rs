//! What the ring buffer needs from the system: a clock, pages, a CPU id, and a way to wake
//! readers. One small trait (or token) per concern.

use core::{marker::PhantomData, ptr::NonNull};

/// A per-CPU monotonic clock that timestamps events.
///
/// The unit is the consumer's business (Linux uses nanoseconds for the `local` clock and TSC cycles
/// for `x86-tsc`); the ring buffer only stores deltas of it.
pub trait Clock {
    /// Current time. It must not go backwards when read twice on the same CPU.
    fn now(&self) -> u64;
}

impl<T: Clock + ?Sized> Clock for &T {
    fn now(&self) -> u64 {
        (**self).now()
    }
}

/// Where sub-buffers, meta pages and bookkeeping come from: whole pages, which a kernel can
/// later map into a user address space.
///
/// # Safety
///
/// `alloc_pages(order)` must return either `None` or a pointer to `PAGE_SIZE << order` bytes,
/// aligned to [`PAGE_SIZE`](crate::format::PAGE_SIZE), zero-filled, not used by anything else
/// until passed back to `free_pages` with the same order, and valid for reads and writes from
/// any CPU.
pub unsafe trait PageAlloc {
    /// Allocates `1 << order` contiguous zeroed pages.
    fn alloc_pages(&self, order: u32) -> Option<NonNull<u8>>;

    /// Frees pages returned by `alloc_pages(order)`.
    ///
    /// # Safety
    ///
    /// `pages` came from `alloc_pages(order)` of this allocator and is no longer used.
    unsafe fn free_pages(&self, pages: NonNull<u8>, order: u32);
}

// SAFETY: forwards to `T`, which upholds the contract.
unsafe impl<T: PageAlloc + ?Sized> PageAlloc for &T {
    fn alloc_pages(&self, order: u32) -> Option<NonNull<u8>> {
        (**self).alloc_pages(order)
    }

    unsafe fn free_pages(&self, pages: NonNull<u8>, order: u32) {
        // SAFETY: the caller upholds the contract of `free_pages`.
        unsafe { (**self).free_pages(pages, order) }
    }
}

/// Wakes readers waiting on a CPU buffer (Linux's `irq_work` + wait queue).
///
/// Called from the writer's commit path, possibly in interrupt or NMI context: it must only
/// do something NMI-safe (set a flag, raise a self-IPI, ...).
pub trait Waiter {
    /// The fill level of `cpu`'s buffer crossed the `buffer_percent` threshold.
    fn wake(&self, cpu: usize);

    /// Whether this waiter does anything; `false` lets writers skip the fill-level check.
    fn wants_wakeups(&self) -> bool {
        true
    }
}

impl<T: Waiter + ?Sized> Waiter for &T {
    fn wake(&self, cpu: usize) {
        (**self).wake(cpu)
    }

    fn wants_wakeups(&self) -> bool {
        (**self).wants_wakeups()
    }
}

/// A [`Waiter`] that wakes nobody (readers poll).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoWaiter;

impl Waiter for NoWaiter {
    fn wake(&self, _cpu: usize) {}

    fn wants_wakeups(&self) -> bool {
        false
    }
}

/// Proof that the code holding it runs on CPU `id` and stays there: what a writer needs.
///
/// Writers of one CPU may interrupt each other (task, softirq, irq, NMI) but must nest: an
/// interrupting writer finishes before the interrupted one resumes. The token is neither
/// `Send` nor `Sync`, so it cannot wander to another thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalCpu {
    id: usize,
    _not_send: PhantomData<*const ()>,
}

impl LocalCpu {
    /// A token for CPU `id`.
    ///
    /// # Safety
    ///
    /// While the token (or a copy) is used to write, the code runs on CPU `id` and cannot
    /// migrate (preemption is off), and every other writer of `id` either runs on `id` too,
    /// nested as described above, or not at all. In a hosted test, "CPU `id`" may be one
    /// thread that is the only writer of `id`.
    pub const unsafe fn new(id: usize) -> Self {
        Self {
            id,
            _not_send: PhantomData,
        }
    }

    /// The CPU id.
    pub const fn id(self) -> usize {
        self.id
    }
}
