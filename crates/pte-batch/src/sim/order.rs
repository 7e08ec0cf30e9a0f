//! An order checker for teardown: wraps a [`PageTable`] and a [`FolioOps`] and records, in one
//! shared [`OrderLog`], which present entries were cleared and not yet flushed from the TLB. An
//! rmap removal or reference drop of a page that some CPU may still reach through a stale TLB
//! entry is a violation (Linux's rule since 6.2: a dirty file folio's rmap goes after the
//! flush, so writeback's `mkclean` sees every writer; and no page is freed under a TLB entry).

use core::cell::RefCell;

use crate::Error;
use crate::hal::{Folio, FolioOps, MaybePinned, PAGE_SIZE, PageAlloc, PageTable, SwapCountFull};

/// Cleared-but-unflushed entries the log can hold (two tables' worth).
const PENDING: usize = 1024;

/// What an [`Ordered`] pair saw: the entries cleared since their last covering flush, and the
/// violations.
#[derive(Debug)]
pub struct OrderLog {
    /// `(address, pfn)` of present entries cleared and not yet flushed.
    pending: [(u64, u64); PENDING],
    len: usize,
    violations: u64,
    first: Option<(u64, u64)>,
    overflow: bool,
}

impl Default for OrderLog {
    fn default() -> Self {
        Self::new()
    }
}

impl OrderLog {
    /// An empty log.
    pub const fn new() -> Self {
        Self {
            pending: [(0, 0); PENDING],
            len: 0,
            violations: 0,
            first: None,
            overflow: false,
        }
    }

    /// Rmap removals and reference drops of a page whose cleared entry was not flushed yet.
    pub fn violations(&self) -> u64 {
        self.violations
    }

    /// `(address, pfn)` of the first violation.
    pub fn first_violation(&self) -> Option<(u64, u64)> {
        self.first
    }

    /// Whether more entries were pending than the log holds (the check is then incomplete).
    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    fn cleared(&mut self, addr: u64, pfn: u64) {
        if self.len == PENDING {
            self.overflow = true;
            return;
        }
        self.pending[self.len] = (addr, pfn);
        self.len += 1;
    }

    fn flushed(&mut self, start: u64, end: u64) {
        let mut i = 0;
        while i < self.len {
            let a = self.pending[i].0;
            if a >= start && a < end {
                self.len -= 1;
                self.pending[i] = self.pending[self.len];
            } else {
                i += 1;
            }
        }
    }

    fn released(&mut self, first_pfn: u64, end_pfn: u64) {
        for &(addr, pfn) in &self.pending[..self.len] {
            if pfn >= first_pfn && pfn < end_pfn {
                self.violations += 1;
                self.first.get_or_insert((addr, pfn));
                return;
            }
        }
    }
}

/// `inner` with its clears, flushes, rmap removals and reference drops checked against `log`.
/// Wrap the zap's table and its folio metadata with the same log.
#[derive(Debug)]
pub struct Ordered<'l, X> {
    inner: X,
    log: &'l RefCell<OrderLog>,
}

impl<'l, X> Ordered<'l, X> {
    /// Checks `inner` into `log`.
    pub fn new(inner: X, log: &'l RefCell<OrderLog>) -> Self {
        Self { inner, log }
    }

    /// The wrapped value.
    pub fn inner(&mut self) -> &mut X {
        &mut self.inner
    }
}

impl<X: PageTable> Ordered<'_, X> {
    fn note(&self, addr: u64, pte: u64) {
        use crate::hal::PteFormat;
        if X::Format::is_present(pte) {
            self.log.borrow_mut().cleared(addr, X::Format::pfn(pte));
        }
    }
}

impl<X: PageTable> PageTable for Ordered<'_, X> {
    type Format = X::Format;
    fn get(&self, addr: u64) -> u64 {
        self.inner.get(addr)
    }
    fn set(&mut self, addr: u64, pte: u64) {
        self.note(addr, self.inner.get(addr));
        self.inner.set(addr, pte)
    }
    fn get_many(&self, addr: u64, out: &mut [u64]) {
        self.inner.get_many(addr, out)
    }
    fn raw_entries(&self, addr: u64, nr: usize) -> Option<&[u64]> {
        self.inner.raw_entries(addr, nr)
    }
    fn atomic_entries(&self, addr: u64, nr: usize) -> Option<&[core::sync::atomic::AtomicU64]> {
        self.inner.atomic_entries(addr, nr)
    }
    fn get_run(&self, addr: u64) -> (u64, usize) {
        self.inner.get_run(addr)
    }
    fn set_ptes(&mut self, addr: u64, pte: u64, nr: usize) {
        self.inner.set_ptes(addr, pte, nr)
    }
    fn wrprotect_ptes(&mut self, addr: u64, nr: usize) {
        self.inner.wrprotect_ptes(addr, nr)
    }
    fn get_and_clear(&mut self, addr: u64) -> u64 {
        let pte = self.inner.get_and_clear(addr);
        self.note(addr, pte);
        pte
    }
    fn get_and_clear_ptes(&mut self, addr: u64, nr: usize) -> u64 {
        for i in 0..nr as u64 {
            let a = addr + i * PAGE_SIZE;
            self.note(a, self.inner.get(a));
        }
        self.inner.get_and_clear_ptes(addr, nr)
    }
    fn flush_tlb_range(&mut self, start: u64, end: u64) {
        self.inner.flush_tlb_range(start, end);
        self.log.borrow_mut().flushed(start, end);
    }
    fn lazy_mmu_enter(&mut self) {
        self.inner.lazy_mmu_enter()
    }
    fn lazy_mmu_leave(&mut self) {
        self.inner.lazy_mmu_leave()
    }
    fn has_table(&self, addr: u64) -> bool {
        self.inner.has_table(addr)
    }
    fn is_huge(&self, addr: u64) -> bool {
        self.inner.is_huge(addr)
    }
    fn prepare(&mut self, addr: u64) -> Result<(), Error> {
        self.inner.prepare(addr)
    }
}

impl<X: FolioOps> FolioOps for Ordered<'_, X> {
    fn folio(&self, pfn: u64) -> Option<Folio> {
        self.inner.folio(pfn)
    }
    fn ref_add(&mut self, folio: &Folio, nr: usize) {
        self.inner.ref_add(folio, nr)
    }
    fn ref_sub(&mut self, folio: &Folio, nr: usize) {
        self.log.borrow_mut().released(folio.pfn, folio.end_pfn());
        self.inner.ref_sub(folio, nr)
    }
    fn try_dup_anon_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize) -> Result<(), MaybePinned> {
        self.inner.try_dup_anon_rmap(folio, pfn, nr)
    }
    fn dup_file_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize) {
        self.inner.dup_file_rmap(folio, pfn, nr)
    }
    fn remove_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize) {
        self.log
            .borrow_mut()
            .released(pfn, pfn.saturating_add(nr as u64));
        self.inner.remove_rmap(folio, pfn, nr)
    }
    fn add_new_anon_rmap(&mut self, pfn: u64) {
        self.inner.add_new_anon_rmap(pfn)
    }
    fn mapcount(&self, pfn: u64) -> usize {
        self.inner.mapcount(pfn)
    }
    fn is_anon_exclusive(&self, pfn: u64) -> bool {
        self.inner.is_anon_exclusive(pfn)
    }
    fn mark_dirty(&mut self, folio: &Folio) {
        self.inner.mark_dirty(folio)
    }
    fn mark_accessed(&mut self, folio: &Folio) {
        self.inner.mark_accessed(folio)
    }
    fn swap_dup(&mut self, pte: u64) -> Result<(), SwapCountFull> {
        self.inner.swap_dup(pte)
    }
    fn swap_count_continuation(&mut self, pte: u64) -> Result<(), Error> {
        self.inner.swap_count_continuation(pte)
    }
    fn swap_free(&mut self, pte: u64) {
        self.inner.swap_free(pte)
    }
    fn swap_free_batch(&mut self, ptes: &[u64]) {
        self.inner.swap_free_batch(ptes)
    }
    fn restore_device_exclusive(&mut self, pfn: u64) -> bool {
        self.inner.restore_device_exclusive(pfn)
    }
}

impl<X: PageAlloc> PageAlloc for Ordered<'_, X> {
    fn alloc_page(&mut self) -> Option<u64> {
        self.inner.alloc_page()
    }
    fn free_page(&mut self, pfn: u64) {
        self.inner.free_page(pfn)
    }
    fn copy_page(&mut self, dst: u64, src: u64) -> Result<(), Error> {
        self.inner.copy_page(dst, src)
    }
}
