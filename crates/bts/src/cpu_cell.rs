//! A CPU's [`BtsCpu`] shared between its switch hooks and an NMI handler, without a lock the
//! NMI could wait on.

use core::{
    cell::UnsafeCell,
    ops::{Deref, DerefMut},
    // Not loom's: the cell is a try-lock on one CPU, outside the loom models.
    sync::atomic::{AtomicBool, Ordering},
};

use crate::BtsCpu;

/// One CPU's [`BtsCpu`] behind a flag that is tried, never waited on: the switch hooks take
/// it with interrupts off, and the PMI handler delivered as an NMI ([`Bts::nmi`]) finds it
/// taken when it interrupted them, and then leaves everything to them.
///
/// Put one per CPU in a `static` (`CpuCell::new` is `const`).
///
/// [`Bts::nmi`]: crate::Bts::nmi
#[derive(Debug)]
pub struct CpuCell<H> {
    busy: AtomicBool,
    cpu: UnsafeCell<BtsCpu<H>>,
}

// SAFETY: the `BtsCpu` is reached only through a `CpuGuard`, and at most one guard exists at a
// time (the `busy` flag, taken with Acquire and given back with Release); so sharing the cell
// only ever moves the `BtsCpu` (with its `H`) between threads.
unsafe impl<H: Send> Sync for CpuCell<H> {}

impl<H> CpuCell<H> {
    /// A cell holding `cpu`.
    pub const fn new(cpu: BtsCpu<H>) -> Self {
        Self {
            busy: AtomicBool::new(false),
            cpu: UnsafeCell::new(cpu),
        }
    }

    /// Takes the CPU state, or `None` at once if someone holds it (on its own CPU: the code
    /// this NMI interrupted). Never spins; callable from any context, NMI included.
    pub fn try_lock(&self) -> Option<CpuGuard<'_, H>> {
        if self.busy.swap(true, Ordering::Acquire) {
            return None;
        }
        Some(CpuGuard { cell: self })
    }
}

/// Exclusive access to a [`CpuCell`]'s [`BtsCpu`]; dropping it gives the cell back.
#[derive(Debug)]
pub struct CpuGuard<'a, H> {
    cell: &'a CpuCell<H>,
}

impl<H> Deref for CpuGuard<'_, H> {
    type Target = BtsCpu<H>;
    fn deref(&self) -> &BtsCpu<H> {
        // SAFETY: this guard is the only one (see `Sync`).
        unsafe { &*self.cell.cpu.get() }
    }
}

impl<H> DerefMut for CpuGuard<'_, H> {
    fn deref_mut(&mut self) -> &mut BtsCpu<H> {
        // SAFETY: this guard is the only one (see `Sync`), and `&mut self` makes this borrow
        // unique among its own.
        unsafe { &mut *self.cell.cpu.get() }
    }
}

impl<H> Drop for CpuGuard<'_, H> {
    fn drop(&mut self) {
        self.cell.busy.store(false, Ordering::Release);
    }
}
