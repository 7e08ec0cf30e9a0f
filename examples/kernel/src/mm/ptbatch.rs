//! The kernel's side of `oskit-pte-batch`'s real x86-64 backend: the physical-memory window
//! (the boot identity map), frames for a child's new page tables, a TLB flush that counts what
//! it issues, and a page-table wrapper that observes (and traces) every batch the crate makes.
//! [`crate::mm::vm`] runs the crate's `Fork` and `Zap` over these for fork and teardown; the folio
//! metadata side is [`crate::mm::framemeta::Folios`].

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use oskit_pte_batch::{
    Error, PageTable, PteFormat, X86Pte,
    x86::{DirectMap, FrameAlloc, NoFrames, NoTlb, TlbFlush, X86PageTables, X86Tlb},
};

use crate::mm::frames::{self, FRAME_SIZE};

/// The boot code identity-maps physical `[0, 4 GiB)`, and the frame allocator hands out frames
/// below 4 GiB only: that is the window every page table is reached through.
const IDENTITY_LIMIT: u64 = 4 << 30;

/// TLB range flushes the crate asked for.
pub static TLB_FLUSHES: AtomicU64 = AtomicU64::new(0);
/// Of those, the ones that reached this CPU's TLB (the space was loaded here): `INVLPG`s or a
/// CR3 reload. An unloaded space (a child being built, a space being destroyed) has nothing
/// cached, so nothing is issued for it.
pub static TLB_FLUSHES_ISSUED: AtomicU64 = AtomicU64::new(0);
/// Pages flushed one by one with `INVLPG` by the issued flushes.
pub static INVLPG_PAGES: AtomicU64 = AtomicU64::new(0);
/// Issued flushes done with a CR3 reload (ranges above `X86Tlb::INVLPG_MAX` pages).
pub static CR3_RELOADS: AtomicU64 = AtomicU64::new(0);
/// `set_ptes` and single-entry `set` calls seen at the child's page tables: one per batch the
/// copy made (the crate writes a batch of one with a plain `set`).
pub static SET_PTES_CALLS: AtomicU64 = AtomicU64::new(0);
/// `get_and_clear_ptes` and single-entry `get_and_clear` calls seen at torn-down page tables:
/// one per folio batch zapped.
pub static CLEAR_PTES_CALLS: AtomicU64 = AtomicU64::new(0);
/// Page-table frames allocated for children.
pub static TABLES_ALLOCATED: AtomicU64 = AtomicU64::new(0);

/// While set, [`Observed`] (and the COW fault) trace nothing per batch or folio: a run over
/// thousands of folios would flood the trace ring and push every earlier step out.
static QUIET: AtomicBool = AtomicBool::new(false);

/// Turns the per-batch and per-folio `"fork"` trace events off (`true`) or back on.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether per-batch and per-folio trace events are off ([`set_quiet`]).
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Page-table frames from the frame allocator (the crate zeroes them).
#[derive(Debug, Default)]
pub struct TableFrames;

impl FrameAlloc for TableFrames {
    fn alloc_frame(&mut self) -> Option<u64> {
        let frame = frames::alloc(0)?;
        TABLES_ALLOCATED.fetch_add(1, Ordering::Relaxed);
        Some(frame)
    }
}

/// The crate's `X86Tlb`, counting what is asked and what is issued.
pub struct CountingTlb(X86Tlb);

impl TlbFlush for CountingTlb {
    fn flush_range(&mut self, root: u64, start: u64, end: u64) {
        TLB_FLUSHES.fetch_add(1, Ordering::Relaxed);
        let cr3: u64;
        // SAFETY: reading CR3 has no side effects.
        unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
        if cr3 & X86Pte::PFN_MASK == root & X86Pte::PFN_MASK {
            TLB_FLUSHES_ISSUED.fetch_add(1, Ordering::Relaxed);
            let pages = end.saturating_sub(start) / FRAME_SIZE;
            if pages > X86Tlb::INVLPG_MAX {
                CR3_RELOADS.fetch_add(1, Ordering::Relaxed);
            } else {
                INVLPG_PAGES.fetch_add(pages, Ordering::Relaxed);
            }
        }
        self.0.flush_range(root, start, end);
    }
}

/// A page table whose batch operations are counted, and traced when they cover more than one
/// page (`"fork"` events): what the crate actually did to the real tables.
pub struct Observed<P>(P);

impl<P: PageTable> PageTable for Observed<P> {
    type Format = P::Format;

    fn get(&self, addr: u64) -> u64 {
        self.0.get(addr)
    }
    // The walker's fast paths, passed through (without them the crate falls back to one
    // `get` per entry for the batch scan and one walk per entry).
    fn get_many(&self, addr: u64, out: &mut [u64]) {
        self.0.get_many(addr, out)
    }
    fn raw_entries(&self, addr: u64, nr: usize) -> Option<&[u64]> {
        self.0.raw_entries(addr, nr)
    }
    fn atomic_entries(&self, addr: u64, nr: usize) -> Option<&[AtomicU64]> {
        self.0.atomic_entries(addr, nr)
    }
    fn get_run(&self, addr: u64) -> (u64, usize) {
        self.0.get_run(addr)
    }
    fn is_huge(&self, addr: u64) -> bool {
        self.0.is_huge(addr)
    }
    fn set(&mut self, addr: u64, pte: u64) {
        SET_PTES_CALLS.fetch_add(1, Ordering::Relaxed);
        self.0.set(addr, pte)
    }
    fn set_ptes(&mut self, addr: u64, pte: u64, nr: usize) {
        SET_PTES_CALLS.fetch_add(1, Ordering::Relaxed);
        if nr > 1 && !quiet() {
            crate::trace!(
                "fork",
                "copy batch {addr:#x}: {nr} PTEs -> frames {:#x}.., {}",
                P::Format::pfn(pte) * FRAME_SIZE,
                if P::Format::is_writable(pte) {
                    "writable"
                } else {
                    "read-only"
                }
            );
        }
        self.0.set_ptes(addr, pte, nr)
    }
    fn wrprotect_ptes(&mut self, addr: u64, nr: usize) {
        self.0.wrprotect_ptes(addr, nr)
    }
    fn get_and_clear(&mut self, addr: u64) -> u64 {
        CLEAR_PTES_CALLS.fetch_add(1, Ordering::Relaxed);
        self.0.get_and_clear(addr)
    }
    fn get_and_clear_ptes(&mut self, addr: u64, nr: usize) -> u64 {
        CLEAR_PTES_CALLS.fetch_add(1, Ordering::Relaxed);
        let first = self.0.get_and_clear_ptes(addr, nr);
        if nr > 1 && !quiet() {
            crate::trace!(
                "fork",
                "zap batch {addr:#x}: {nr} PTEs of frames {:#x}..",
                P::Format::pfn(first) * FRAME_SIZE
            );
        }
        first
    }
    fn flush_tlb_range(&mut self, start: u64, end: u64) {
        self.0.flush_tlb_range(start, end)
    }
    fn lazy_mmu_enter(&mut self) {
        self.0.lazy_mmu_enter()
    }
    fn lazy_mmu_leave(&mut self) {
        self.0.lazy_mmu_leave()
    }
    fn has_table(&self, addr: u64) -> bool {
        self.0.has_table(addr)
    }
    fn prepare(&mut self, addr: u64) -> Result<(), Error> {
        self.0.prepare(addr)
    }
}

/// An existing space's tables: entries change or go, no table is added; flushes reach this
/// CPU's TLB when the space is loaded here.
pub type SpaceTables = Observed<X86PageTables<DirectMap, NoFrames, CountingTlb>>;
/// A child's tables while fork builds them: missing tables come from the frame allocator, and
/// nothing needs flushing (it has never been loaded).
pub type ChildTables = Observed<X86PageTables<DirectMap, TableFrames, NoTlb>>;

/// The identity map as the crate's window.
pub fn window() -> DirectMap {
    // SAFETY: the boot page tables map physical [0, 4 GiB) at the same virtual addresses,
    // read/write for the kernel, forever (PML4 entry 0, shared by every address space).
    unsafe { DirectMap::new(0, IDENTITY_LIMIT) }
}

/// The tables of the space whose PML4 is at `root`.
///
/// # Safety
/// Ring 0. `root` is a live space's PML4 whose user tables nobody else changes while the
/// value is used (the caller holds `vm`'s space lock); if the space is loaded, it is on this
/// CPU only (one task per space).
pub unsafe fn space_tables(root: u64) -> SpaceTables {
    // SAFETY: by the contract; no PCID is ever enabled.
    Observed(unsafe { X86PageTables::new(root, window(), NoFrames, CountingTlb(X86Tlb::new())) })
}

/// The tables of a child being forked, whose PML4 is at `root`.
///
/// # Safety
/// As [`space_tables`], and the space is loaded nowhere.
pub unsafe fn child_tables(root: u64) -> ChildTables {
    // SAFETY: by the contract; table frames come from the allocator, unused and below 4 GiB.
    Observed(unsafe { X86PageTables::new(root, window(), TableFrames, NoTlb) })
}
