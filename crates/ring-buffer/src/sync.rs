//! Atomics and a spin lock that become loom's model types under `cfg(loom)`.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use core::{
    cell::UnsafeCell,
    ops::{Deref, DerefMut},
};

/// Waits a little for another CPU (or, under loom, lets another thread run).
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}

/// A test-and-test-and-set lock for the reader side (Linux's `reader_lock`). Writers never
/// take it.
pub(crate) struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the lock hands out `&mut T` to one holder at a time, like a mutex.
unsafe impl<T: Send> Sync for SpinLock<T> {}
// SAFETY: owning the lock owns the value.
unsafe impl<T: Send> Send for SpinLock<T> {}

impl<T> SpinLock<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// The lock if it is free now (for callers that may have interrupted its holder).
    pub(crate) fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            .then_some(SpinGuard { lock: self })
    }

    pub(crate) fn lock(&self) -> SpinGuard<'_, T> {
        loop {
            if self
                .locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return SpinGuard { lock: self };
            }
            while self.locked.load(Ordering::Relaxed) {
                spin_hint();
            }
        }
    }
}

pub(crate) struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: holding the guard means holding the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: holding the guard means holding the lock, exclusively.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

/// A counter or word written only by the writers of one CPU (which nest like interrupts),
/// read by anyone: Linux's `local_t`. On x86-64 its read-modify-writes are single
/// instructions without the `lock` prefix — atomic against interrupts on the same CPU, which
/// is all a CPU-local word needs, and several times cheaper than a locked operation. Elsewhere
/// (and under loom or miri) they are ordinary atomics.
#[repr(transparent)]
pub(crate) struct Local<A>(pub(crate) A);

macro_rules! local_impl {
    ($atomic:ty, $int:ty, $width:literal, $acc:literal) => {
        impl Local<$atomic> {
            pub(crate) fn new(v: $int) -> Self {
                Self(<$atomic>::new(v))
            }

            #[inline]
            pub(crate) fn load(&self, order: Ordering) -> $int {
                self.0.load(order)
            }

            #[inline]
            pub(crate) fn store(&self, v: $int, order: Ordering) {
                self.0.store(v, order)
            }

            /// Adds `v` (wrapping) and returns the previous value.
            #[inline]
            pub(crate) fn fetch_add(&self, v: $int) -> $int {
                #[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
                {
                    let mut old = v;
                    // SAFETY: `xadd` on the atomic's own, aligned storage. Only the owning CPU's
                    // writers modify it, and one instruction cannot be split by an interrupt,
                    // so without `lock` it is still an atomic read-modify-write for every
                    // observer; other CPUs only load it.
                    unsafe {
                        core::arch::asm!(
                            concat!("xadd ", $width, " ptr [{p}], {v:", $acc, "}"),
                            p = in(reg) self.0.as_ptr(),
                            v = inout(reg) old,
                            options(nostack),
                        )
                    };
                    old
                }
                #[cfg(not(all(target_arch = "x86_64", not(loom), not(miri))))]
                {
                    self.0.fetch_add(v, Ordering::AcqRel)
                }
            }

            /// Compare-and-swap; returns whether it stored `new`.
            #[inline]
            #[allow(dead_code)]
            pub(crate) fn cas(&self, old: $int, new: $int) -> bool {
                #[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
                {
                    let prev: $int;
                    // SAFETY: as in `fetch_add`: `cmpxchg` on our own aligned storage, which
                    // only this CPU's (nesting) writers modify.
                    unsafe {
                        core::arch::asm!(
                            concat!("cmpxchg ", $width, " ptr [{p}], {new:", $acc, "}"),
                            p = in(reg) self.0.as_ptr(),
                            new = in(reg) new,
                            inout("rax") old => prev,
                            options(nostack),
                        )
                    };
                    prev == old
                }
                #[cfg(not(all(target_arch = "x86_64", not(loom), not(miri))))]
                {
                    self.0
                        .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                }
            }
        }
    };
}

local_impl!(AtomicU64, u64, "qword", "r");

/// A place in the write path where an interrupt on the writer's CPU may run a nested writer.
/// Nothing outside loom models; under loom, [`interrupts`] lets a test run a nested write
/// exactly there.
#[inline(always)]
pub(crate) fn interrupt_point() {
    #[cfg(loom)]
    interrupts::point();
}

/// Loom only: simulated interrupts at the write path's interrupt points.
#[cfg(loom)]
pub mod interrupts {
    extern crate std;
    use std::{boxed::Box, cell::RefCell};

    type Hook = Box<dyn FnMut()>;

    std::thread_local! {
        /// Points still to pass before the hook runs, and the hook. Per OS thread: loom runs
        /// a model's threads on the test's own thread, and tests run in parallel.
        static ARMED: RefCell<Option<(usize, Hook)>> = const { RefCell::new(None) };
    }

    /// Runs `hook` (once, as an interrupt of the writer) at the `n`-th interrupt point from
    /// now (0 = the next one). Only the writer thread of a model may pass interrupt points.
    pub fn arm(n: usize, hook: impl FnMut() + 'static) {
        ARMED.with(|a| *a.borrow_mut() = Some((n, Box::new(hook))));
    }

    /// Disarms; returns whether the hook had run.
    pub fn disarm() -> bool {
        ARMED.with(|a| a.borrow_mut().take().is_none())
    }

    pub(crate) fn point() {
        let hook = ARMED.with(|a| {
            let mut armed = a.borrow_mut();
            match armed.as_mut() {
                Some((0, _)) => armed.take(),
                Some((n, _)) => {
                    *n -= 1;
                    None
                }
                None => None,
            }
        });
        // Taken out first: the nested writer passes interrupt points of its own.
        if let Some((_, mut hook)) = hook {
            hook();
        }
    }
}
