//! Software models: a CPU that stores branch records as the SDM specifies, and a fixed pool
//! of page-aligned memory to allocate locked buffers from. Used by the tests, fuzzing, the
//! benches and kernels running where BTS is absent (every VM: neither KVM nor QEMU exposes it).

use core::{cell::UnsafeCell, ptr::NonNull};

use crate::{
    format::{BtsRecord, DsArea, FLAG_PREDICTED, RECORD_SIZE},
    hal::{BtsHardware, BtsSupport, DebugCtl, LockedAlloc, PAGE_SIZE},
    sync::{AtomicBool, Ordering},
};

/// What [`SoftCpu::branch`] did with a branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// No record: BTS off (TR or BTS clear), or filtered out by CPL, or both BTS_OFF_* set.
    NotStored,
    /// Stored; no interrupt.
    Stored,
    /// Stored, and the index reached the threshold with the interrupt unmasked: the CPU
    /// delivered the threshold interrupt (and the LVT entry is now masked until re-armed).
    Interrupt,
    /// Not stored: BTINT is set and the index is at the absolute maximum (the buffer is full).
    Full,
    /// Not stored: the DS area is absent or its index lies outside the BTS buffer. (A real
    /// CPU would write there anyway; the model refuses, so it never writes out of bounds.)
    Fault,
}

/// A software CPU with BTS: IA32_DEBUGCTL, IA32_DS_AREA, a current privilege level, and the
/// performance-monitoring LVT entry's mask.
#[derive(Debug, Clone)]
pub struct SoftCpu {
    support: BtsSupport,
    debugctl: u64,
    ds_area: u64,
    cpl: u8,
    lvt_masked: bool,
    pending: bool,
}

impl Default for SoftCpu {
    fn default() -> Self {
        Self::with_support(BtsSupport {
            debug_store: true,
            dtes64: true,
            bts_enabled: true,
        })
    }
}

impl SoftCpu {
    /// A software CPU that reports `support` when probed.
    pub const fn with_support(support: BtsSupport) -> Self {
        Self {
            support,
            debugctl: 0,
            ds_area: 0,
            cpl: 0,
            lvt_masked: false,
            pending: false,
        }
    }

    /// Sets the current privilege level (0 = kernel, 3 = user).
    pub fn set_cpl(&mut self, cpl: u8) {
        self.cpl = cpl & 3;
    }

    /// The current privilege level.
    pub fn cpl(&self) -> u8 {
        self.cpl
    }

    /// Takes the pending threshold interrupt, if one was delivered.
    pub fn take_interrupt(&mut self) -> bool {
        core::mem::take(&mut self.pending)
    }

    /// Whether the LVT entry is masked (an interrupt was delivered and not re-armed).
    pub fn interrupt_masked(&self) -> bool {
        self.lvt_masked
    }

    /// Executes a taken branch at the current CPL, storing a record as the SDM specifies
    /// (Table "CPL-Qualified Branch Trace Store Encodings"):
    /// - TR and BTS must be set; BTS_OFF_OS skips CPL 0, BTS_OFF_USR skips CPL > 0;
    /// - the record goes at `bts_index`, which advances by one record;
    /// - with BTINT clear, reaching `bts_absolute_maximum` wraps the index to
    ///   `bts_buffer_base` (circular buffer); with BTINT set the index stays there and later
    ///   branches are not stored ([`Store::Full`]; the SDM leaves this case to software);
    /// - reaching `bts_interrupt_threshold` delivers the threshold interrupt unless the LVT
    ///   entry is masked (BTINT alone does not prevent it: software puts the threshold out of
    ///   reach for a circular buffer).
    pub fn branch(&mut self, from: u64, to: u64, predicted: bool) -> Store {
        let ctl = DebugCtl(self.debugctl);
        if !ctl.has(DebugCtl::TR | DebugCtl::BTS) {
            return Store::NotStored;
        }
        let off = if self.cpl == 0 {
            DebugCtl::BTS_OFF_OS
        } else {
            DebugCtl::BTS_OFF_USR
        };
        if ctl.has(off) {
            return Store::NotStored;
        }
        if self.ds_area == 0 {
            return Store::Fault;
        }
        let ds_ptr = core::ptr::with_exposed_provenance_mut::<DsArea>(self.ds_area as usize);
        // SAFETY: `set_ds_area`'s contract: while BTS is enabled the DS area is valid.
        let ds = unsafe { ds_ptr.read_unaligned() };
        let record = RECORD_SIZE as u64;
        let (base, max, index) = (ds.bts_buffer_base, ds.bts_absolute_maximum, ds.bts_index);
        let btint = ctl.has(DebugCtl::BTINT);
        if btint && index >= max && index >= base {
            return Store::Full;
        }
        let in_buffer = index >= base && index.checked_add(record).is_some_and(|end| end <= max);
        if !in_buffer {
            return Store::Fault;
        }
        let rec = BtsRecord {
            from,
            to,
            flags: if predicted { FLAG_PREDICTED } else { 0 },
        };
        let at = core::ptr::with_exposed_provenance_mut::<BtsRecord>(index as usize);
        let mut next = index + record;
        if next >= max && !btint {
            next = base;
        }
        // SAFETY: `set_ds_area`'s contract: [base, max) is the valid, writable BTS buffer,
        // and `index .. index + 24` lies inside it (checked above).
        unsafe {
            at.write_unaligned(rec);
            (&raw mut (*ds_ptr).bts_index).write_unaligned(next);
        }
        if next >= ds.bts_interrupt_threshold && !self.lvt_masked {
            self.lvt_masked = true;
            self.pending = true;
            return Store::Interrupt;
        }
        Store::Stored
    }
}

impl BtsHardware for SoftCpu {
    fn probe(&self) -> BtsSupport {
        self.support
    }
    fn debugctl(&self) -> DebugCtl {
        DebugCtl(self.debugctl)
    }
    unsafe fn set_debugctl(&mut self, value: DebugCtl) {
        self.debugctl = value.0;
    }
    fn ds_area(&self) -> u64 {
        self.ds_area
    }
    unsafe fn set_ds_area(&mut self, linear: u64) {
        self.ds_area = linear;
    }
    fn rearm_threshold_interrupt(&mut self) {
        self.lvt_masked = false;
    }
}

#[repr(C, align(4096))]
struct Page(UnsafeCell<[u8; PAGE_SIZE]>);

/// A fixed pool of `P` page-aligned pages with a first-fit allocator, for kernels without a
/// page allocator of their own (and for tests). Put it in a `static`.
pub struct PagePool<const P: usize> {
    pages: [Page; P],
    used: [AtomicBool; P],
    lock: AtomicBool,
}

// SAFETY: pages are handed out exclusively (tracked in `used` under `lock`); the pool itself
// only touches the bookkeeping atomics.
unsafe impl<const P: usize> Sync for PagePool<P> {}

impl<const P: usize> Default for PagePool<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const P: usize> PagePool<P> {
    /// An empty pool.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            pages: [const { Page(UnsafeCell::new([0; PAGE_SIZE])) }; P],
            used: [const { AtomicBool::new(false) }; P],
            lock: AtomicBool::new(false),
        }
    }

    /// An empty pool.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            pages: [const { Page(UnsafeCell::new([0; PAGE_SIZE])) }; P],
            used: core::array::from_fn(|_| AtomicBool::new(false)),
            lock: AtomicBool::new(false),
        }
    }

    /// Pages currently allocated.
    pub fn in_use(&self) -> usize {
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
            crate::sync::spin_loop();
        }
        let r = f();
        self.lock.store(false, Ordering::Release);
        r
    }
}

// SAFETY: a run of pages is handed out only while marked used, and every page is aligned to
// PAGE_SIZE and lives as long as the pool (which must outlive its users: a `static`).
unsafe impl<const P: usize> LockedAlloc for PagePool<P> {
    fn alloc_pages(&self, pages: usize) -> Option<NonNull<u8>> {
        if pages == 0 || pages > P {
            return None;
        }
        self.locked(|| {
            let mut start = 0;
            while start + pages <= P {
                match (start..start + pages).find(|&i| self.used[i].load(Ordering::Relaxed)) {
                    Some(busy) => start = busy + 1,
                    None => {
                        for u in &self.used[start..start + pages] {
                            u.store(true, Ordering::Relaxed);
                        }
                        // From the whole array, not from page `start` (whose pointer covers
                        // that page only), so the run is reachable; every byte is inside an
                        // `UnsafeCell`, so it may be written through a pointer from `&self`.
                        let run = self.pages.as_ptr().wrapping_add(start);
                        return NonNull::new(run.cast::<u8>().cast_mut());
                    }
                }
            }
            None
        })
    }

    unsafe fn free_pages(&self, ptr: NonNull<u8>, pages: usize) {
        let offset = (ptr.as_ptr() as usize).wrapping_sub(self.pages.as_ptr() as usize);
        let start = offset / PAGE_SIZE;
        assert!(
            offset % PAGE_SIZE == 0 && start + pages <= P,
            "free_pages: not from this pool"
        );
        self.locked(|| {
            for u in &self.used[start..start + pages] {
                u.store(false, Ordering::Relaxed);
            }
        });
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
        let first = pool.alloc_pages(1).unwrap();
        let run = pool.alloc_pages(3).unwrap();
        // SAFETY: `run` is 3 pages we own; `first` one page, disjoint from it.
        unsafe {
            run.as_ptr().write_bytes(0xa5, 3 * PAGE_SIZE);
            assert_eq!(*run.as_ptr().add(3 * PAGE_SIZE - 1), 0xa5);
            assert_eq!(*first.as_ptr(), 0, "the run overlapped the first page");
            pool.free_pages(run, 3);
            pool.free_pages(first, 1);
        }
        assert!(pool.alloc_pages(4).is_some());
    }
}
