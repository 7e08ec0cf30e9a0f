//! Copy at fork: the parent's PTEs of one VMA into the child's, a batch of one folio at a time
//! (`copy_pte_range` / `copy_present_ptes`).

use crate::batch::{BatchFlags, folio_pte_batch};
use crate::hal::{Folio, FolioOps, PAGE_SIZE, PageAlloc, PageTable, PteFormat, table_end};
use crate::vma::{Rss, Vma};
use crate::{Error, check_range};

mod rare;

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
    /// [`Error::HugeMapping`] names the first address a huge parent entry maps (the tables
    /// before it are copied).
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
            if !src.has_table(addr) && src.is_huge(addr) {
                return Err(Error::HugeMapping { addr });
            }
            if src.has_table(addr) {
                dst.prepare(addr)?;
                // No rescheduling: the loop drops its progress counter.
                self.pte_range::<D, S, false>(dst, src, addr, next, &mut || false)?;
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
        self.pte_range::<D, S, true>(dst, src, addr, end, need_resched)
    }

    /// [`copy_pte_range`](Self::copy_pte_range), asking `need_resched` only if `RESCHED`.
    #[inline(always)]
    fn pte_range<D, S, const RESCHED: bool>(
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
        let mut hot = Hot::new(self.src, self.dst);
        src.lazy_mmu_enter();
        dst.lazy_mmu_enter();
        let result = self.range_loop::<D, S, RESCHED>(dst, src, addr, end, need_resched, &mut hot);
        dst.lazy_mmu_leave();
        src.lazy_mmu_leave();
        self.absorb(&hot);
        if let Some((s, e)) = hot.wp.range() {
            src.flush_tlb_range(s, e);
            self.stats.tlb_flushes += 1;
        }
        result
    }

    /// The loop of [`copy_pte_range`](Self::copy_pte_range) (`copy_pte_range`'s do-while):
    /// runs of none and small-folio entries in [`small_run`], everything else (a large folio's
    /// batch, the rare cases) one call each.
    #[inline(always)]
    fn range_loop<D, S, const RESCHED: bool>(
        &mut self,
        dst: &mut D,
        src: &mut S,
        addr: u64,
        end: u64,
        need_resched: &mut impl FnMut() -> bool,
        hot: &mut Hot,
    ) -> Result<Progress, Error>
    where
        D: PageTable,
        S: PageTable<Format = D::Format>,
    {
        let mut addr = addr;
        let mut progress = 0usize;
        loop {
            let pte = if self.prealloc.is_none() {
                let mem = &mut *self.mem;
                // Until the first write-protect, the loop notes where the range to flush
                // starts; from then on only where it ends.
                let stop = if hot.wp.is_open() {
                    small_run::<M, D, S, RESCHED, true>(
                        mem,
                        hot,
                        dst,
                        src,
                        &mut addr,
                        end,
                        &mut progress,
                        need_resched,
                    )
                } else {
                    small_run::<M, D, S, RESCHED, false>(
                        mem,
                        hot,
                        dst,
                        src,
                        &mut addr,
                        end,
                        &mut progress,
                        need_resched,
                    )
                };
                match stop {
                    Stop::Done => return Ok(Progress::Done),
                    Stop::Yield => return Ok(Progress::Yield(addr)),
                    Stop::WpOpened => continue,
                    Stop::Entry(pte) => pte,
                }
            } else {
                // A page is preallocated for the next entry: no fast path.
                if addr >= end {
                    return Ok(Progress::Done);
                }
                if RESCHED && progress >= 32 {
                    progress = 0;
                    if need_resched() {
                        return Ok(Progress::Yield(addr));
                    }
                }
                let pte = src.get(addr);
                if D::Format::is_none(pte) {
                    progress += 1;
                    addr += PAGE_SIZE;
                    continue;
                }
                pte
            };
            // 0: a page was preallocated, retry the entry.
            let nr = self.copy_other(dst, src, addr, pte, end, hot)?;
            progress += 8 * nr;
            addr += nr as u64 * PAGE_SIZE;
        }
    }

    /// Everything [`small_run`] declines: a non-present entry, a frame without `struct page`,
    /// a possibly pinned anon page or large folio (the [`Error::Again`] → preallocate → retry
    /// cycle), and any entry while a page is preallocated. Returns how
    /// many entries were copied, 0 when a page was just preallocated and the entry must be
    /// tried again.
    #[inline(never)]
    fn copy_other<D, S>(
        &mut self,
        dst: &mut D,
        src: &mut S,
        addr: u64,
        pte: u64,
        end: u64,
        hot: &mut Hot,
    ) -> Result<usize, Error>
    where
        D: PageTable,
        S: PageTable<Format = D::Format>,
    {
        if !D::Format::is_present(pte) {
            return self.copy_nonpresent_pte(dst, src, addr, pte, hot);
        }
        let max_nr = ((end - addr) / PAGE_SIZE) as usize;
        match self.copy_present_inner(dst, src, addr, pte, max_nr, hot) {
            Ok(nr) => {
                // A preallocated page serves one attempt only.
                if self.prealloc.is_some() {
                    self.drop_prealloc();
                }
                Ok(nr)
            }
            Err(Error::Again) if self.prealloc.is_none() => {
                self.stats.again += 1;
                dst.lazy_mmu_leave();
                src.lazy_mmu_leave();
                let page = self.mem.alloc_page();
                src.lazy_mmu_enter();
                dst.lazy_mmu_enter();
                self.prealloc = Some(page.ok_or(Error::NoMemory)?);
                Ok(0)
            }
            Err(e) => Err(e),
        }
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

    /// Adds what one loop accumulated in `hot` to the totals.
    fn absorb(&mut self, hot: &Hot) {
        self.rss += hot.rss;
        // Every present entry copied is accounted in RSS (a page copy too) unless it has no
        // `struct page`; a batch of `nr` entries is `nr - 1` entries more than batches.
        let present = (hot.rss.anon + hot.rss.file) as u64 + hot.pageless;
        self.stats.present += present;
        self.stats.batches += present - hot.batched_extra;
        self.stats.page_copies += hot.page_copies;
        self.stats.nonpresent += hot.nonpresent;
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
            hot.pageless += 1;
            hot.set_child(dst, src, addr, pte);
            return Ok(1);
        };
        // One entry: a small folio, the range's last entry, or a page is preallocated (a copy
        // is likely, so don't bother batching).
        if !folio.is_large() || max_nr <= 1 || self.prealloc.is_some() {
            if !dup_folio(&mut *self.mem, &mut hot.rss, &folio, pfn, 1) {
                return self.copy_present_page(dst, addr, pte, hot);
            }
            hot.set_child(dst, src, addr, pte);
            return Ok(1);
        }
        let mut wp = hot.wp;
        let nr = copy_batch(
            &mut *self.mem,
            hot,
            &mut wp,
            dst,
            src,
            addr,
            pte,
            folio,
            max_nr,
        );
        hot.wp = wp;
        match nr {
            0 => Err(Error::Again),
            nr => Ok(nr),
        }
    }
}

/// What one range loop decides once (from the VMAs) and accumulates.
#[derive(Clone, Copy)]
struct Hot {
    /// Private, possibly writable mapping: writable parent entries are write-protected.
    cow: bool,
    child: ChildPte,
    batch_flags: BatchFlags,
    rss: Rss,
    /// Present entries copied without a `struct page` (not in RSS).
    pageless: u64,
    /// Sum of `nr - 1` over the batches (entries copied minus batches).
    batched_extra: u64,
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
            child: ChildPte {
                shared: src.is_shared(),
                keep_uffd_wp: dst.uffd_wp(),
            },
            batch_flags,
            rss: Rss::default(),
            pageless: 0,
            batched_extra: 0,
            page_copies: 0,
            nonpresent: 0,
            wp: WrprotectRange::default(),
        }
    }

    /// `__copy_present_ptes` for one entry (the slow paths): write-protect a COW parent,
    /// derive the child's entry, map it.
    #[inline(always)]
    fn set_child<D, S>(&mut self, dst: &mut D, src: &mut S, addr: u64, pte: u64)
    where
        D: PageTable,
        S: PageTable<Format = D::Format>,
    {
        let mut pte = pte;
        if self.cow && D::Format::is_writable(pte) {
            // Always the backend's write-protect: on real hardware it is atomic, so a dirty
            // bit the MMU sets meanwhile is not lost.
            src.wrprotect_ptes(addr, 1);
            self.wp.add(addr, 1);
            pte = D::Format::wrprotect(pte);
        }
        dst.set(addr, self.child.apply::<D::Format>(pte));
    }
}

/// How the child's entry derives from the parent's.
#[derive(Clone, Copy)]
struct ChildPte {
    /// Shared mapping: the child maps clean.
    shared: bool,
    /// The child keeps uffd-wp bits.
    keep_uffd_wp: bool,
}

impl ChildPte {
    /// The child's entry from the parent's (already write-protected if COW): clean in a
    /// shared mapping, always old, uffd-wp only if the child keeps it.
    #[inline(always)]
    fn apply<F: PteFormat>(self, pte: u64) -> u64 {
        let mut pte = pte;
        if self.shared {
            pte = F::mkclean(pte);
        }
        pte = F::mkold(pte);
        if !self.keep_uffd_wp {
            pte = F::clear_uffd_wp(pte);
        }
        pte
    }
}

/// Where [`small_run`] stopped.
enum Stop {
    /// At the end of the range.
    Done,
    /// `need_resched` asked to stop.
    Yield,
    /// The first parent entries were write-protected: go on with the loop that only notes
    /// where the range to flush ends.
    WpOpened,
    /// At an entry the loop does not handle (non-present, no `struct page`, a possibly pinned
    /// page), with its value.
    Entry(u64),
}

/// Copies none entries, present entries of small folios (as Linux's per-PTE code does, which
/// this must cost no more than: the only extra work is the "is the folio large?" test) and
/// large folios' batches (one call each) from `*addr` on, until the range ends,
/// `need_resched` asks to stop (if `RESCHED`: checked as the range loop does, every 32 units
/// of progress), the first parent entries are write-protected (unless `WP_OPEN`: the range to
/// flush already has a start, and the loop only moves its end) or an entry needs
/// [`Fork::copy_other`]. Out of line, with the loop's state in locals: the compiler keeps
/// them in registers.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn small_run<M, D, S, const RESCHED: bool, const WP_OPEN: bool>(
    mem: &mut M,
    hot: &mut Hot,
    dst: &mut D,
    src: &mut S,
    addr: &mut u64,
    end: u64,
    progress: &mut usize,
    need_resched: &mut impl FnMut() -> bool,
) -> Stop
where
    M: FolioOps,
    D: PageTable,
    S: PageTable<Format = D::Format>,
{
    type F<D> = <D as PageTable>::Format;
    let (mut a, mut done) = (*addr, *progress);
    let (cow, child) = (hot.cow, hot.child);
    let mut wp = hot.wp;
    let stop = loop {
        if a >= end {
            break Stop::Done;
        }
        if RESCHED && done >= 32 {
            done = 0;
            if need_resched() {
                break Stop::Yield;
            }
        }
        let mut pte = src.get(a);
        if F::<D>::is_none(pte) {
            if RESCHED {
                done += 1;
            }
            a += PAGE_SIZE;
            continue;
        }
        if !F::<D>::is_present(pte) || F::<D>::is_special(pte) {
            break Stop::Entry(pte);
        }
        let pfn = F::<D>::pfn(pte);
        let Some(folio) = mem.folio(pfn) else {
            break Stop::Entry(pte);
        };
        if folio.is_large() {
            if !folio.contains(pfn) {
                break Stop::Entry(pte);
            }
            let max_nr = ((end - a) / PAGE_SIZE) as usize;
            let nr = copy_batch(mem, hot, &mut wp, dst, src, a, pte, folio, max_nr);
            if nr == 0 {
                break Stop::Entry(pte);
            }
            if RESCHED {
                done += 8 * nr;
            }
            a += nr as u64 * PAGE_SIZE;
            if !WP_OPEN && wp.is_open() {
                break Stop::WpOpened;
            }
            continue;
        }
        // A small folio contains the frame if it starts there (one compare, not two).
        if folio.pfn != pfn || folio.nr_pages == 0 {
            break Stop::Entry(pte);
        }
        if !dup_folio(mem, &mut hot.rss, &folio, pfn, 1) {
            break Stop::Entry(pte);
        }
        if cow && F::<D>::is_writable(pte) {
            // The backend's write-protect: on real hardware it is atomic, so a dirty bit the
            // MMU sets meanwhile is not lost.
            src.wrprotect_ptes(a, 1);
            if !WP_OPEN {
                wp.start = a;
            }
            wp.end = a + PAGE_SIZE;
            pte = F::<D>::wrprotect(pte);
        }
        dst.set(a, child.apply::<F<D>>(pte));
        if RESCHED {
            done += 8;
        }
        a += PAGE_SIZE;
        if !WP_OPEN && wp.is_open() {
            break Stop::WpOpened;
        }
    };
    (*addr, *progress) = (a, done);
    hot.wp = wp;
    stop
}

/// Takes the references and rmap duplicates of `nr` pages of `folio` from `pfn` for the
/// child, and counts them in `rss`; false (nothing changed) when the anon folio may be pinned
/// and the child needs its own copy.
#[inline(always)]
fn dup_folio<M: FolioOps>(mem: &mut M, rss: &mut Rss, folio: &Folio, pfn: u64, nr: usize) -> bool {
    mem.ref_add(folio, nr);
    if folio.anon {
        if mem.try_dup_anon_rmap(folio, pfn, nr).is_err() {
            undo_ref(mem, folio, nr);
            return false;
        }
        rss.anon += nr as i64;
    } else {
        mem.dup_file_rmap(folio, pfn, nr);
        rss.file += nr as i64;
    }
    true
}

/// Drops the references of a copy that cannot go ahead (rare: out of line).
#[cold]
#[inline(never)]
fn undo_ref<M: FolioOps>(mem: &mut M, folio: &Folio, nr: usize) {
    mem.ref_sub(folio, nr);
}

/// The batch of a large folio from the present entry `pte` (in `folio`), at most `max_nr`:
/// one reference add, one rmap dup, one write-protect and one `set_ptes` for the whole run.
/// Returns its length, or 0 (changing nothing) when the folio may be pinned: the caller needs
/// a preallocated page. Out of line: paid once per batch.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn copy_batch<M, D, S>(
    mem: &mut M,
    hot: &mut Hot,
    wp: &mut WrprotectRange,
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
    if !dup_folio(mem, &mut hot.rss, &folio, pfn, nr) {
        return 0;
    }
    let mut pte = pte;
    if batch.any_writable {
        pte = D::Format::mkwrite(pte);
        if hot.cow {
            // The backend's write-protect of the whole run: on real hardware it is atomic, so
            // a dirty bit the MMU sets meanwhile is not lost; the contiguous-bit backend keeps
            // fully covered blocks folded.
            src.wrprotect_ptes(addr, nr);
            wp.add(addr, nr);
            pte = D::Format::wrprotect(pte);
        }
    }
    dst.set_ptes(addr, hot.child.apply::<D::Format>(pte), nr);
    hot.batched_extra += nr as u64 - 1;
    nr
}

/// The span of parent entries write-protected by one range copy (whose addresses only grow).
#[derive(Default, Clone, Copy)]
struct WrprotectRange {
    start: u64,
    end: u64,
}

impl WrprotectRange {
    #[inline(always)]
    fn add(&mut self, addr: u64, nr: usize) {
        if self.start == self.end {
            self.start = addr;
        }
        self.end = addr + nr as u64 * PAGE_SIZE;
    }
    /// Whether some entries were write-protected (the range has a start).
    #[inline(always)]
    fn is_open(&self) -> bool {
        self.start != self.end
    }
    fn range(&self) -> Option<(u64, u64)> {
        self.is_open().then_some((self.start, self.end))
    }
}
