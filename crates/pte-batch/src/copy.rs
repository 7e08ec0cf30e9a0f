//! Copy at fork: the parent's PTEs of one VMA into the child's, a batch of one folio at a time
//! (`copy_pte_range` / `copy_present_ptes`).

use crate::batch::{BatchFlags, folio_pte_batch};
use crate::hal::{FolioOps, PAGE_SIZE, PageAlloc, PageTable, PteFormat, table_end};
use crate::vma::{Rss, Vma};
use crate::{Error, check_range};

/// Counters of what a copy did, for tests and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyStats {
    /// Present entries copied.
    pub present: u64,
    /// Runs of present entries handled by one `set_ptes` (a single entry counts as one).
    pub batches: u64,
    /// Non-present entries copied.
    pub nonpresent: u64,
    /// Pages copied for the child because they may be pinned.
    pub page_copies: u64,
    /// Times a batch or entry asked for a preallocated page.
    pub again: u64,
    /// Parent TLB range flushes issued after write-protecting.
    pub tlb_flushes: u64,
}

/// One fork of one VMA: copies parent entries into the child and accounts the child's RSS.
///
/// `M` is the kernel's folio metadata and page allocator. A page preallocated for a pinned page
/// and left unused is freed on drop.
pub struct Fork<'m, M: FolioOps + PageAlloc> {
    mem: &'m mut M,
    src: Vma,
    dst: Vma,
    rss: Rss,
    prealloc: Option<u64>,
    stats: CopyStats,
}

impl<M: FolioOps + PageAlloc> Drop for Fork<'_, M> {
    fn drop(&mut self) {
        if let Some(pfn) = self.prealloc.take() {
            self.mem.free_page(pfn);
        }
    }
}

/// Where an interruptible range copy stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The whole range is copied.
    Done,
    /// `need_resched` asked to stop; call again from this address.
    Yield(u64),
}

impl<'m, M: FolioOps + PageAlloc> Fork<'m, M> {
    /// Copies from a parent mapping `src` into the child's copy of it, `dst` (usually the same
    /// but for [`VmFlags::UFFD_WP`](crate::VmFlags::UFFD_WP), which a child may not keep).
    pub fn new(mem: &'m mut M, src: Vma, dst: Vma) -> Self {
        Self {
            mem,
            src,
            dst,
            rss: Rss::default(),
            prealloc: None,
            stats: CopyStats::default(),
        }
    }

    /// The child's RSS gained so far (also after an error: what was copied stays copied).
    pub fn rss(&self) -> Rss {
        self.rss
    }

    /// What was done so far.
    pub fn stats(&self) -> CopyStats {
        self.stats
    }

    /// The folio metadata and allocator.
    pub fn mem(&mut self) -> &mut M {
        self.mem
    }

    /// Copies `[start, end)` from `src` into `dst`, table by table, allocating the child's
    /// tables with [`PageTable::prepare`] and skipping parent addresses without a table.
    ///
    /// On error the entries before the failing one are copied and accounted.
    pub fn copy_range<D, S>(
        &mut self,
        dst: &mut D,
        src: &mut S,
        start: u64,
        end: u64,
    ) -> Result<(), Error>
    where
        D: PageTable,
        S: PageTable<Format = D::Format>,
    {
        check_range(start, end)?;
        let mut addr = start;
        while addr < end {
            let next = table_end(addr).map_or(end, |e| e.min(end));
            if src.has_table(addr) {
                dst.prepare(addr)?;
                let mut never = || false;
                self.copy_pte_range(dst, src, addr, next, &mut never)?;
            }
            addr = next;
        }
        Ok(())
    }

    /// Copies `[addr, end)`, which must lie in one last-level table (`copy_pte_range`). The
    /// child's table must exist ([`PageTable::prepare`]; [`copy_range`](Self::copy_range) does
    /// that).
    ///
    /// Every 32 units of progress (a none entry is 1, any other entry 8) `need_resched` is asked
    /// whether to stop so the caller can reschedule; [`Progress::Yield`] tells where to resume.
    /// A possibly pinned anon page is copied into a page from [`PageAlloc`] (the batch is retried
    /// one page at a time). Parent entries that were write-protected are flushed from the TLB
    /// once, before returning.
    pub fn copy_pte_range<D, S>(
        &mut self,
        dst: &mut D,
        src: &mut S,
        addr: u64,
        end: u64,
        need_resched: &mut impl FnMut() -> bool,
    ) -> Result<Progress, Error>
    where
        D: PageTable,
        S: PageTable<Format = D::Format>,
    {
        check_range(addr, end)?;
        if addr == end {
            return Ok(Progress::Done);
        }
        if table_end(addr).is_some_and(|t| end > t) {
            return Err(Error::InvalidRange);
        }
        let mut wp = WrprotectRange::default();
        let mut addr = addr;
        let mut progress = 0usize;
        src.lazy_mmu_enter();
        dst.lazy_mmu_enter();
        let result = loop {
            if addr >= end {
                break Ok(Progress::Done);
            }
            if progress >= 32 {
                progress = 0;
                if need_resched() {
                    break Ok(Progress::Yield(addr));
                }
            }
            let pte = src.get(addr);
            if D::Format::is_none(pte) {
                progress += 1;
                addr += PAGE_SIZE;
                continue;
            }
            if !D::Format::is_present(pte) {
                if let Err(e) = self.copy_nonpresent_pte(dst, addr, pte) {
                    break Err(e);
                }
                progress += 8;
                addr += PAGE_SIZE;
                continue;
            }
            let max_nr = ((end - addr) / PAGE_SIZE) as usize;
            match self.copy_present_inner(dst, src, addr, pte, max_nr, &mut wp) {
                Ok(nr) => {
                    // A preallocated page serves one attempt only.
                    if let Some(p) = self.prealloc.take() {
                        self.mem.free_page(p);
                    }
                    progress += 8 * nr;
                    addr += nr as u64 * PAGE_SIZE;
                }
                Err(Error::Again) if self.prealloc.is_none() => {
                    self.stats.again += 1;
                    dst.lazy_mmu_leave();
                    src.lazy_mmu_leave();
                    let page = self.mem.alloc_page();
                    src.lazy_mmu_enter();
                    dst.lazy_mmu_enter();
                    match page {
                        Some(p) => self.prealloc = Some(p),
                        None => break Err(Error::NoMemory),
                    }
                }
                Err(e) => break Err(e),
            }
        };
        dst.lazy_mmu_leave();
        src.lazy_mmu_leave();
        if let Some((s, e)) = wp.range() {
            src.flush_tlb_range(s, e);
            self.stats.tlb_flushes += 1;
        }
        result
    }

    /// Copies the present entry `pte` at `addr` and as many following entries of the same folio
    /// as batch with it, at most `max_nr` (`copy_present_ptes`). Returns how many were copied.
    ///
    /// [`Error::Again`]: the page may be pinned and no page is preallocated; the caller
    /// allocates one with [`preallocate`](Self::preallocate) and calls again. The parent's TLB
    /// is not flushed; the caller flushes the write-protected range.
    pub fn copy_present_ptes<D, S>(
        &mut self,
        dst: &mut D,
        src: &mut S,
        addr: u64,
        pte: u64,
        max_nr: usize,
    ) -> Result<usize, Error>
    where
        D: PageTable,
        S: PageTable<Format = D::Format>,
    {
        let mut wp = WrprotectRange::default();
        self.copy_present_inner(dst, src, addr, pte, max_nr.max(1), &mut wp)
    }

    /// Holds `pfn` (a page from [`PageAlloc::alloc_page`]) for the next possibly pinned page.
    /// A page already held is freed.
    pub fn preallocate(&mut self, pfn: u64) {
        if let Some(old) = self.prealloc.replace(pfn) {
            self.mem.free_page(old);
        }
    }

    #[inline]
    fn copy_present_inner<D, S>(
        &mut self,
        dst: &mut D,
        src: &mut S,
        addr: u64,
        pte: u64,
        max_nr: usize,
        wp: &mut WrprotectRange,
    ) -> Result<usize, Error>
    where
        D: PageTable,
        S: PageTable<Format = D::Format>,
    {
        let pfn = D::Format::pfn(pte);
        let folio = if D::Format::is_special(pte) {
            None
        } else {
            self.mem.folio(pfn).filter(|f| f.contains(pfn))
        };
        let Some(folio) = folio else {
            self.set_child(dst, src, addr, pte, 1, wp);
            return Ok(1);
        };
        // When a copy is likely (a page is preallocated), don't bother batching.
        if self.prealloc.is_none() && folio.is_large() && max_nr > 1 {
            let mut flags = BatchFlags::empty();
            if self.src.is_shared() {
                flags |= BatchFlags::IGNORE_DIRTY;
            }
            if !self.src.soft_dirty_tracked() {
                flags |= BatchFlags::IGNORE_SOFT_DIRTY;
            }
            let batch = folio_pte_batch(src, &folio, addr, pte, max_nr, flags);
            let nr = batch.nr;
            self.mem.ref_add(&folio, nr);
            if folio.anon {
                if self.mem.try_dup_anon_rmap(&folio, pfn, nr).is_err() {
                    self.mem.ref_sub(&folio, nr);
                    return Err(Error::Again);
                }
                self.rss.anon += nr as i64;
            } else {
                self.mem.dup_file_rmap(&folio, pfn, nr);
                self.rss.file += nr as i64;
            }
            let pte = if batch.any_writable {
                D::Format::mkwrite(pte)
            } else {
                pte
            };
            self.set_child(dst, src, addr, pte, nr, wp);
            return Ok(nr);
        }
        self.mem.ref_add(&folio, 1);
        if folio.anon {
            if self.mem.try_dup_anon_rmap(&folio, pfn, 1).is_err() {
                self.mem.ref_sub(&folio, 1);
                return self.copy_present_page(dst, addr, pte);
            }
            self.rss.anon += 1;
        } else {
            self.mem.dup_file_rmap(&folio, pfn, 1);
            self.rss.file += 1;
        }
        self.set_child(dst, src, addr, pte, 1, wp);
        Ok(1)
    }

    /// The child gets its own copy of a possibly pinned anon page (`copy_present_page`).
    fn copy_present_page<D: PageTable>(
        &mut self,
        dst: &mut D,
        addr: u64,
        pte: u64,
    ) -> Result<usize, Error> {
        let Some(new) = self.prealloc.take() else {
            return Err(Error::Again);
        };
        if let Err(e) = self.mem.copy_page(new, D::Format::pfn(pte)) {
            self.prealloc = Some(new);
            return Err(e);
        }
        self.mem.add_new_anon_rmap(new);
        self.rss.anon += 1;
        self.stats.page_copies += 1;
        self.stats.present += 1;
        self.stats.batches += 1;
        let mut child = D::Format::mkdirty(D::Format::with_pfn(self.dst.page_prot, new));
        if self.dst.is_writable() {
            child = D::Format::mkwrite(child);
        }
        if self.dst.uffd_wp() && D::Format::is_uffd_wp(pte) {
            child = D::Format::mk_uffd_wp(child);
        }
        dst.set(addr, child);
        Ok(1)
    }

    /// `__copy_present_ptes`: write-protect a COW parent, derive the child's entry, map it.
    #[inline]
    fn set_child<D, S>(
        &mut self,
        dst: &mut D,
        src: &mut S,
        addr: u64,
        pte: u64,
        nr: usize,
        wp: &mut WrprotectRange,
    ) where
        D: PageTable,
        S: PageTable<Format = D::Format>,
    {
        let mut pte = pte;
        if self.src.is_cow() && D::Format::is_writable(pte) {
            // Always the backend's write-protect: on real hardware it is atomic, so a dirty
            // bit the MMU sets meanwhile is not lost.
            src.wrprotect_ptes(addr, nr);
            wp.add(addr, nr);
            pte = D::Format::wrprotect(pte);
        }
        if self.src.is_shared() {
            pte = D::Format::mkclean(pte);
        }
        pte = D::Format::mkold(pte);
        if !self.dst.uffd_wp() {
            pte = D::Format::clear_uffd_wp(pte);
        }
        // The child is not live yet; one entry (the common small-folio case) takes the plain
        // accessor.
        if nr == 1 {
            dst.set(addr, pte);
        } else {
            dst.set_ptes(addr, pte, nr);
        }
        self.stats.present += nr as u64;
        self.stats.batches += 1;
    }

    /// A swap entry: one more reference to the swap slot; uffd-wp only if the child keeps it.
    fn copy_nonpresent_pte<D: PageTable>(
        &mut self,
        dst: &mut D,
        addr: u64,
        pte: u64,
    ) -> Result<(), Error> {
        self.mem.swap_dup(pte)?;
        self.rss.swap += 1;
        self.stats.nonpresent += 1;
        let pte = if self.dst.uffd_wp() {
            pte
        } else {
            D::Format::swp_clear_uffd_wp(pte)
        };
        dst.set(addr, pte);
        Ok(())
    }
}

/// The span of parent entries write-protected by one range copy.
#[derive(Default)]
struct WrprotectRange {
    start: u64,
    end: u64,
}

impl WrprotectRange {
    #[inline]
    fn add(&mut self, addr: u64, nr: usize) {
        let e = addr + nr as u64 * PAGE_SIZE;
        if self.start == self.end {
            (self.start, self.end) = (addr, e);
        } else {
            self.start = self.start.min(addr);
            self.end = self.end.max(e);
        }
    }
    fn range(&self) -> Option<(u64, u64)> {
        (self.start != self.end).then_some((self.start, self.end))
    }
}
