//! Copy at fork: the parent's PTEs of one VMA into the child's, a batch of one folio at a time
//! (`copy_pte_range` / `copy_present_ptes`).

use crate::batch::{BatchFlags, folio_pte_batch};
use crate::hal::{Folio, FolioOps, PAGE_SIZE, PageAlloc, PageTable, PteFormat, table_end};
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
        // Everything the loop updates lives in locals (registers), written back once: through
        // `&mut self` every counter would be a load and a store per entry.
        let mut hot = Hot::new(self.src, self.dst);
        let mut addr = addr;
        let mut progress = 0usize;
        src.lazy_mmu_enter();
        dst.lazy_mmu_enter();
        let result = loop {
            // The run of none and small-folio entries, in a function of its own whose `&mut`
            // parameters tell the compiler that the metadata and the tables don't alias: it
            // then keeps their fields in registers across the entry and metadata stores.
            let fast = self.prealloc.is_none();
            let pte = match fast_run(
                &mut *self.mem,
                &mut hot,
                dst,
                src,
                &mut addr,
                end,
                &mut progress,
                need_resched,
                fast,
            ) {
                Stop::Done => break Ok(Progress::Done),
                Stop::Yield => break Ok(Progress::Yield(addr)),
                Stop::Entry(pte) => pte,
            };
            if !D::Format::is_present(pte) {
                if let Err(e) = self.copy_nonpresent_pte(dst, addr, pte, &mut hot) {
                    break Err(e);
                }
                progress += 8;
                addr += PAGE_SIZE;
                continue;
            }
            let max_nr = ((end - addr) / PAGE_SIZE) as usize;
            match self.copy_present_slow(dst, src, addr, pte, max_nr, &mut hot) {
                Ok(nr) => {
                    // A preallocated page serves one attempt only.
                    if self.prealloc.is_some() {
                        self.drop_prealloc();
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
        self.absorb(&hot);
        if let Some((s, e)) = hot.wp.range() {
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
        let mut hot = Hot::new(self.src, self.dst);
        let r = self.copy_present_inner(dst, src, addr, pte, max_nr.max(1), &mut hot);
        self.absorb(&hot);
        r
    }

    /// Holds `pfn` (a page from [`PageAlloc::alloc_page`]) for the next possibly pinned page.
    /// A page already held is freed.
    pub fn preallocate(&mut self, pfn: u64) {
        if let Some(old) = self.prealloc.replace(pfn) {
            self.mem.free_page(old);
        }
    }

    #[cold]
    #[inline(never)]
    fn drop_prealloc(&mut self) {
        if let Some(p) = self.prealloc.take() {
            self.mem.free_page(p);
        }
    }

    /// Adds what one loop accumulated in `hot` to the totals.
    fn absorb(&mut self, hot: &Hot) {
        self.rss += hot.rss;
        self.stats.present += hot.present;
        self.stats.batches += hot.batches;
        self.stats.page_copies += hot.page_copies;
        self.stats.nonpresent += hot.nonpresent;
    }

    /// Everything [`copy_small`] declines, out of line so the loop stays
    /// small.
    #[inline(never)]
    fn copy_present_slow<D, S>(
        &mut self,
        dst: &mut D,
        src: &mut S,
        addr: u64,
        pte: u64,
        max_nr: usize,
        hot: &mut Hot,
    ) -> Result<usize, Error>
    where
        D: PageTable,
        S: PageTable<Format = D::Format>,
    {
        self.copy_present_inner(dst, src, addr, pte, max_nr, hot)
    }

    #[inline(always)]
    fn copy_present_inner<D, S>(
        &mut self,
        dst: &mut D,
        src: &mut S,
        addr: u64,
        pte: u64,
        max_nr: usize,
        hot: &mut Hot,
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
            hot.set_child(dst, src, addr, pte, 1);
            return Ok(1);
        };
        // One entry: a small folio, the range's last entry, or a page is preallocated (a copy
        // is likely, so don't bother batching).
        if !folio.is_large() || max_nr <= 1 || self.prealloc.is_some() {
            self.mem.ref_add(&folio, 1);
            if folio.anon {
                if self.mem.try_dup_anon_rmap(&folio, pfn, 1).is_err() {
                    self.mem.ref_sub(&folio, 1);
                    return self.copy_present_page(dst, addr, pte, hot);
                }
                hot.rss.anon += 1;
            } else {
                self.mem.dup_file_rmap(&folio, pfn, 1);
                hot.rss.file += 1;
            }
            hot.set_child(dst, src, addr, pte, 1);
            return Ok(1);
        }
        match copy_batch(&mut *self.mem, hot, dst, src, addr, pte, folio, max_nr) {
            0 => Err(Error::Again),
            nr => Ok(nr),
        }
    }

    /// The child gets its own copy of a possibly pinned anon page (`copy_present_page`).
    #[cold]
    #[inline(never)]
    fn copy_present_page<D: PageTable>(
        &mut self,
        dst: &mut D,
        addr: u64,
        pte: u64,
        hot: &mut Hot,
    ) -> Result<usize, Error> {
        let Some(new) = self.prealloc.take() else {
            return Err(Error::Again);
        };
        if let Err(e) = self.mem.copy_page(new, D::Format::pfn(pte)) {
            self.prealloc = Some(new);
            return Err(e);
        }
        self.mem.add_new_anon_rmap(new);
        hot.rss.anon += 1;
        hot.page_copies += 1;
        hot.present += 1;
        hot.batches += 1;
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

    /// A swap entry: one more reference to the swap slot; uffd-wp only if the child keeps it.
    #[inline(never)]
    fn copy_nonpresent_pte<D: PageTable>(
        &mut self,
        dst: &mut D,
        addr: u64,
        pte: u64,
        hot: &mut Hot,
    ) -> Result<(), Error> {
        self.mem.swap_dup(pte)?;
        hot.rss.swap += 1;
        hot.nonpresent += 1;
        let pte = if self.dst.uffd_wp() {
            pte
        } else {
            D::Format::swp_clear_uffd_wp(pte)
        };
        dst.set(addr, pte);
        Ok(())
    }
}

/// What one range loop decides once (from the VMAs) and accumulates, kept out of `Fork` so the
/// compiler holds it in registers across the folio metadata calls.
#[derive(Clone, Copy)]
struct Hot {
    /// Private, possibly writable mapping: writable parent entries are write-protected.
    cow: bool,
    /// Shared mapping: the child maps clean.
    shared: bool,
    /// The child keeps uffd-wp bits.
    keep_uffd_wp: bool,
    batch_flags: BatchFlags,
    rss: Rss,
    present: u64,
    batches: u64,
    page_copies: u64,
    nonpresent: u64,
    wp: WrprotectRange,
}

impl Hot {
    #[inline]
    fn new(src: Vma, dst: Vma) -> Self {
        let mut batch_flags = BatchFlags::empty();
        if src.is_shared() {
            batch_flags |= BatchFlags::IGNORE_DIRTY;
        }
        if !src.soft_dirty_tracked() {
            batch_flags |= BatchFlags::IGNORE_SOFT_DIRTY;
        }
        Self {
            cow: src.is_cow(),
            shared: src.is_shared(),
            keep_uffd_wp: dst.uffd_wp(),
            batch_flags,
            rss: Rss::default(),
            present: 0,
            batches: 0,
            page_copies: 0,
            nonpresent: 0,
            wp: WrprotectRange::default(),
        }
    }

    /// `__copy_present_ptes`: write-protect a COW parent, derive the child's entry, map it.
    #[inline(always)]
    fn set_child<D, S>(&mut self, dst: &mut D, src: &mut S, addr: u64, pte: u64, nr: usize)
    where
        D: PageTable,
        S: PageTable<Format = D::Format>,
    {
        let mut pte = pte;
        if self.cow && D::Format::is_writable(pte) {
            // Always the backend's write-protect: on real hardware it is atomic, so a dirty
            // bit the MMU sets meanwhile is not lost.
            src.wrprotect_ptes(addr, nr);
            self.wp.add(addr, nr);
            pte = D::Format::wrprotect(pte);
        }
        if self.shared {
            pte = D::Format::mkclean(pte);
        }
        pte = D::Format::mkold(pte);
        if !self.keep_uffd_wp {
            pte = D::Format::clear_uffd_wp(pte);
        }
        // The child is not live yet; one entry (the common small-folio case) takes the plain
        // accessor.
        if nr == 1 {
            dst.set(addr, pte);
        } else {
            dst.set_ptes(addr, pte, nr);
        }
        self.present += nr as u64;
        self.batches += 1;
    }
}

/// Where [`fast_run`] stopped.
enum Stop {
    /// At the end of the range.
    Done,
    /// `need_resched` asked to stop.
    Yield,
    /// At an entry the fast path does not handle (non-present, or present but not a lone
    /// small-folio entry), with its value.
    Entry(u64),
}

/// Copies none entries and lone small-folio entries from `*addr` on, until the range ends,
/// `need_resched` asks to stop (checked as the range loop does) or an entry needs the slow path.
/// With `fast` false (a page is preallocated) every present entry goes to the slow path.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn fast_run<M, D, S>(
    mem: &mut M,
    hot: &mut Hot,
    dst: &mut D,
    src: &mut S,
    addr: &mut u64,
    end: u64,
    progress: &mut usize,
    need_resched: &mut impl FnMut() -> bool,
    fast: bool,
) -> Stop
where
    M: FolioOps,
    D: PageTable,
    S: PageTable<Format = D::Format>,
{
    let (mut a, mut done) = (*addr, *progress);
    let stop = loop {
        if a >= end {
            break Stop::Done;
        }
        if done >= 32 {
            done = 0;
            if need_resched() {
                break Stop::Yield;
            }
        }
        let pte = src.get(a);
        if D::Format::is_none(pte) {
            done += 1;
            a += PAGE_SIZE;
            continue;
        }
        if !fast || !D::Format::is_present(pte) {
            break Stop::Entry(pte);
        }
        let nr = copy_small(mem, hot, dst, src, a, pte, ((end - a) / PAGE_SIZE) as usize);
        if nr == 0 {
            break Stop::Entry(pte);
        }
        done += 8 * nr;
        a += nr as u64 * PAGE_SIZE;
    };
    (*addr, *progress) = (a, done);
    stop
}

/// The common cases without a preallocated page: one present entry of a small folio (Linux's
/// pre-batch per-PTE copy, which this must cost no more than), or a batch of a large folio.
/// Returns how many entries were copied, or 0, having changed nothing, for everything else
/// (no `struct page`, a possibly pinned anon page), which [`Fork::copy_present_slow`] handles:
/// a pinned page is tried again there.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn copy_small<M, D, S>(
    mem: &mut M,
    hot: &mut Hot,
    dst: &mut D,
    src: &mut S,
    addr: u64,
    pte: u64,
    max_nr: usize,
) -> usize
where
    M: FolioOps,
    D: PageTable,
    S: PageTable<Format = D::Format>,
{
    if D::Format::is_special(pte) {
        return 0;
    }
    let pfn = D::Format::pfn(pte);
    let Some(folio) = mem.folio(pfn) else {
        return 0;
    };
    if !folio.contains(pfn) {
        return 0;
    }
    if folio.is_large() && max_nr > 1 {
        return copy_batch(mem, hot, dst, src, addr, pte, folio, max_nr);
    }
    mem.ref_add(&folio, 1);
    if folio.anon {
        if mem.try_dup_anon_rmap(&folio, pfn, 1).is_err() {
            mem.ref_sub(&folio, 1);
            return 0;
        }
        hot.rss.anon += 1;
    } else {
        mem.dup_file_rmap(&folio, pfn, 1);
        hot.rss.file += 1;
    }
    hot.set_child(dst, src, addr, pte, 1);
    1
}

/// The batch of a large folio from the present entry `pte` (in `folio`): one reference add,
/// one rmap dup, one write-protect and one `set_ptes` for the whole run. Returns its length, or
/// 0 (changing nothing) when the folio may be pinned: the caller needs a preallocated page.
/// Out of line: the per-entry loop stays small, and the call is paid once per batch.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn copy_batch<M, D, S>(
    mem: &mut M,
    hot: &mut Hot,
    dst: &mut D,
    src: &mut S,
    addr: u64,
    pte: u64,
    folio: Folio,
    max_nr: usize,
) -> usize
where
    M: FolioOps,
    D: PageTable,
    S: PageTable<Format = D::Format>,
{
    let pfn = D::Format::pfn(pte);
    let batch = folio_pte_batch(src, &folio, addr, pte, max_nr, hot.batch_flags);
    let nr = batch.nr;
    mem.ref_add(&folio, nr);
    if folio.anon {
        if mem.try_dup_anon_rmap(&folio, pfn, nr).is_err() {
            mem.ref_sub(&folio, nr);
            return 0;
        }
        hot.rss.anon += nr as i64;
    } else {
        mem.dup_file_rmap(&folio, pfn, nr);
        hot.rss.file += nr as i64;
    }
    let pte = if batch.any_writable {
        D::Format::mkwrite(pte)
    } else {
        pte
    };
    hot.set_child(dst, src, addr, pte, nr);
    nr
}

/// The span of parent entries write-protected by one range copy.
#[derive(Default, Clone, Copy)]
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
