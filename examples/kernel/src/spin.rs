//! A spinlock for kernel data shared between CPUs, tasks and interrupt handlers.

use core::{
    arch::asm,
    cell::UnsafeCell,
    ops::{Deref, DerefMut},
    sync::atomic::{AtomicBool, Ordering},
};

/// Mutual exclusion by spinning, with interrupts off on this CPU while the lock is held.
///
/// Interrupts off makes the lock safe against the two ways a holder could be stopped on its
/// own CPU: an interrupt handler that wants the same lock, and preemption by the timer (which
/// would let another task on this CPU spin forever on a lock whose holder cannot run).
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the lock hands out at most one guard at a time, so `T` is only ever reached from one
// CPU at a time; `T: Send` lets it move between CPUs.
unsafe impl<T: Send> Sync for SpinLock<T> {}

/// Saves RFLAGS and disables interrupts; returns whether they were on.
pub fn irq_save() -> bool {
    let flags: u64;
    // SAFETY: reads RFLAGS and clears IF. Not `nomem`: the asm must also be a compiler barrier,
    // so no access to locked data moves before interrupts are off.
    unsafe { asm!("pushfq", "pop {}", "cli", out(reg) flags) };
    flags & (1 << 9) != 0
}

/// Re-enables interrupts if `enabled` (what [`irq_save`] returned).
pub fn irq_restore(enabled: bool) {
    if enabled {
        // SAFETY: turning interrupts back on, as they were before `irq_save`. Not `nomem`: no
        // access to locked data (nor the unlocking store) may move after it.
        unsafe { asm!("sti", options(nostack)) };
    }
}

impl<T> SpinLock<T> {
    /// An unlocked lock around `value`.
    pub const fn new(value: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Disables interrupts and spins until the lock is ours.
    pub fn lock(&self) -> SpinGuard<'_, T> {
        let irq = irq_save();
        loop {
            if self
                .locked
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return SpinGuard { lock: self, irq };
            }
            while self.locked.load(Ordering::Relaxed) {
                core::hint::spin_loop();
            }
        }
    }
}

/// Access to a [`SpinLock`]'s value; unlocks (and restores interrupts) when dropped.
pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
    irq: bool,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while this CPU holds the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard exists only while this CPU holds the lock, and `&mut self` makes
        // this the only reference derived from it.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
        irq_restore(self.irq);
    }
}
