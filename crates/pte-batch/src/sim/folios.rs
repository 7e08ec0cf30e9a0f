//! A `struct page` array model: folios, references, mapcounts, anon-exclusive and pin state,
//! and a page allocator over the free pages.

use crate::Error;
use crate::hal::{Folio, FolioOps, MaybePinned, PageAlloc, SwapCountFull};

/// One frame's metadata. Folio-wide fields live in the head page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimPage {
    /// Part of a folio (else free).
    pub used: bool,
    /// PFN of the folio's head page.
    pub head: u64,
    /// Head: log2 of the folio's pages.
    pub order: u8,
    /// Head: anonymous folio.
    pub anon: bool,
    /// Head: may be DMA-pinned (`folio_maybe_dma_pinned` in a VMA with pins).
    pub pinned: bool,
    /// Head: reference count.
    pub refcount: i64,
    /// Head: sum of the mapcounts of the folio's pages.
    pub total_mapcount: i64,
    /// Head: marked dirty by a zap.
    pub dirty: bool,
    /// Head: marked accessed by a zap.
    pub accessed: bool,
    /// Page-table entries mapping this page.
    pub mapcount: i64,
    /// Anon page exclusive to one process.
    pub anon_exclusive: bool,
    /// Reading the page fails (memory error).
    pub poisoned: bool,
    /// Stand-in for the page's contents, copied by [`PageAlloc::copy_page`].
    pub data: u64,
}

/// Page metadata for the frames `[base_pfn, base_pfn + pages.len())`, in caller memory.
/// Frames outside have no `struct page` (like MMIO).
///
/// Every mutation checks the invariants "refcount >= total mapcount" and "mapcount >= 0";
/// [`violations`](Self::violations) counts breaches.
#[derive(Debug)]
pub struct SimFolios<'a> {
    base_pfn: u64,
    pages: &'a mut [SimPage],
    cursor: usize,
    alloc_budget: Option<usize>,
    violations: u64,
    frees: u64,
    swap_refs: i64,
    swap_full: u32,
    continuations: u64,
    restore_exclusive: bool,
    restores: u64,
}

impl<'a> SimFolios<'a> {
    /// Metadata over `pages` (all free) for frames from `base_pfn`.
    pub fn new(base_pfn: u64, pages: &'a mut [SimPage]) -> Self {
        pages.fill(SimPage::default());
        Self {
            base_pfn,
            pages,
            cursor: 0,
            alloc_budget: None,
            violations: 0,
            frees: 0,
            swap_refs: 0,
            swap_full: 0,
            continuations: 0,
            restore_exclusive: false,
            restores: 0,
        }
    }

    /// Metadata over `pages` as they are (e.g. a snapshot taken with [`pages`](Self::pages)).
    pub fn from_pages(base_pfn: u64, pages: &'a mut [SimPage]) -> Self {
        Self {
            base_pfn,
            pages,
            cursor: 0,
            alloc_budget: None,
            violations: 0,
            frees: 0,
            swap_refs: 0,
            swap_full: 0,
            continuations: 0,
            restore_exclusive: false,
            restores: 0,
        }
    }

    #[inline(always)]
    fn idx(&self, pfn: u64) -> Option<usize> {
        let i = usize::try_from(pfn.checked_sub(self.base_pfn)?).ok()?;
        (i < self.pages.len()).then_some(i)
    }

    /// The metadata of frame `pfn`.
    #[inline]
    pub fn page(&self, pfn: u64) -> Option<&SimPage> {
        self.idx(pfn).map(|i| &self.pages[i])
    }

    /// The metadata of frame `pfn`, for setting up a scenario.
    pub fn page_mut(&mut self, pfn: u64) -> Option<&mut SimPage> {
        self.idx(pfn).map(|i| &mut self.pages[i])
    }

    /// Makes the free frames `[pfn, pfn + 2^order)` one folio, unmapped with no references.
    /// Returns `None` if the frames are misaligned, outside, or in use.
    pub fn add_folio(&mut self, pfn: u64, order: u8, anon: bool) -> Option<Folio> {
        let nr = 1u64.checked_shl(u32::from(order))?;
        if pfn % nr != 0 {
            return None;
        }
        let first = self.idx(pfn)?;
        let last = self.idx(pfn + nr - 1)?;
        if self.pages[first..=last].iter().any(|p| p.used) {
            return None;
        }
        for p in &mut self.pages[first..=last] {
            *p = SimPage {
                used: true,
                head: pfn,
                ..SimPage::default()
            };
        }
        let head = &mut self.pages[first];
        head.order = order;
        head.anon = anon;
        Some(Folio {
            pfn,
            nr_pages: nr,
            anon,
        })
    }

    /// Accounts one page-table entry mapping `pfn` (one reference and one mapcount), as the
    /// fault that installed it would have.
    pub fn account_mapping(&mut self, pfn: u64) -> bool {
        let Some(i) = self.idx(pfn) else { return false };
        if !self.pages[i].used {
            return false;
        }
        let Some(h) = self.idx(self.pages[i].head) else {
            return false;
        };
        self.pages[i].mapcount += 1;
        self.pages[h].total_mapcount += 1;
        self.pages[h].refcount += 1;
        true
    }

    /// Breaches of the refcount/mapcount invariants seen so far.
    pub fn violations(&self) -> u64 {
        self.violations
    }

    /// Folios freed (refcount reached zero) plus pages returned with `free_page`.
    pub fn frees(&self) -> u64 {
        self.frees
    }

    /// Net swap-slot references taken by copies minus those dropped by zaps.
    pub fn swap_refs(&self) -> i64 {
        self.swap_refs
    }

    /// Makes the next `n` calls of [`FolioOps::swap_dup`] report a full swap count (each one
    /// then needs a continuation, which takes a page from the allocation budget).
    pub fn set_swap_count_full(&mut self, n: u32) {
        self.swap_full = n;
    }

    /// Swap-count continuations added.
    pub fn continuations(&self) -> u64 {
        self.continuations
    }

    /// Whether [`FolioOps::restore_device_exclusive`] succeeds (a device revokes its access).
    pub fn set_restore_device_exclusive(&mut self, on: bool) {
        self.restore_exclusive = on;
    }

    /// Device-exclusive entries restored.
    pub fn restores(&self) -> u64 {
        self.restores
    }

    /// Lets only `n` more allocations succeed (`None`: unlimited).
    pub fn set_alloc_budget(&mut self, n: Option<usize>) {
        self.alloc_budget = n;
    }

    /// Frames in use.
    pub fn used_pages(&self) -> usize {
        self.pages.iter().filter(|p| p.used).count()
    }

    /// All pages, in PFN order.
    pub fn pages(&self) -> &[SimPage] {
        self.pages
    }

    #[inline(always)]
    fn head(&self, folio: &Folio) -> Option<usize> {
        let h = self.idx(folio.pfn)?;
        (self.pages[h].used && self.pages[h].head == folio.pfn).then_some(h)
    }

    #[inline(always)]
    fn check(&mut self, h: usize) {
        let p = &self.pages[h];
        if p.refcount < p.total_mapcount || p.total_mapcount < 0 || p.refcount < 0 {
            self.violations += 1;
        }
    }

    /// The page range `[pfn, pfn + nr)` if it lies in the store.
    #[inline(always)]
    fn range(&self, pfn: u64, nr: usize) -> Option<core::ops::Range<usize>> {
        let s = self.idx(pfn)?;
        let e = s.checked_add(nr)?;
        (e <= self.pages.len()).then_some(s..e)
    }
}

impl FolioOps for SimFolios<'_> {
    #[inline(always)]
    fn folio(&self, pfn: u64) -> Option<Folio> {
        let p = self.page(pfn)?;
        if !p.used {
            return None;
        }
        let h = self.page(p.head)?;
        Some(Folio {
            pfn: p.head,
            nr_pages: 1u64 << h.order.min(63),
            anon: h.anon,
        })
    }

    #[inline(always)]
    fn ref_add(&mut self, folio: &Folio, nr: usize) {
        let Some(h) = self.head(folio) else { return };
        self.pages[h].refcount += nr as i64;
        self.check(h);
    }

    #[inline]
    fn ref_sub(&mut self, folio: &Folio, nr: usize) {
        let Some(h) = self.head(folio) else { return };
        self.pages[h].refcount -= nr as i64;
        self.check(h);
        if self.pages[h].refcount == 0 {
            let end = (h + (1usize << self.pages[h].order)).min(self.pages.len());
            self.pages[h..end].fill(SimPage::default());
            self.frees += 1;
        }
    }

    #[inline(always)]
    fn try_dup_anon_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize) -> Result<(), MaybePinned> {
        let (Some(h), Some(r)) = (self.head(folio), self.range(pfn, nr)) else {
            return Ok(());
        };
        if self.pages[h].pinned && self.pages[r.clone()].iter().any(|p| p.anon_exclusive) {
            return Err(MaybePinned);
        }
        for p in &mut self.pages[r] {
            p.anon_exclusive = false;
            p.mapcount += 1;
        }
        self.pages[h].total_mapcount += nr as i64;
        self.check(h);
        Ok(())
    }

    #[inline(always)]
    fn dup_file_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize) {
        let (Some(h), Some(r)) = (self.head(folio), self.range(pfn, nr)) else {
            return;
        };
        for p in &mut self.pages[r] {
            p.mapcount += 1;
        }
        self.pages[h].total_mapcount += nr as i64;
        self.check(h);
    }

    #[inline(always)]
    fn remove_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize) {
        let (Some(h), Some(r)) = (self.head(folio), self.range(pfn, nr)) else {
            return;
        };
        let mut negative = false;
        for p in &mut self.pages[r] {
            p.mapcount -= 1;
            negative |= p.mapcount < 0;
        }
        self.pages[h].total_mapcount -= nr as i64;
        if negative {
            self.violations += 1;
        }
        self.check(h);
    }

    fn add_new_anon_rmap(&mut self, pfn: u64) {
        let Some(i) = self.idx(pfn) else { return };
        let p = &mut self.pages[i];
        p.anon = true;
        p.anon_exclusive = true;
        p.mapcount = 1;
        p.total_mapcount = 1;
        self.check(i);
    }

    fn mapcount(&self, pfn: u64) -> usize {
        self.page(pfn).map_or(0, |p| p.mapcount.max(0) as usize)
    }

    fn is_anon_exclusive(&self, pfn: u64) -> bool {
        self.page(pfn).is_some_and(|p| p.anon_exclusive)
    }

    fn mark_dirty(&mut self, folio: &Folio) {
        if let Some(h) = self.head(folio) {
            self.pages[h].dirty = true;
        }
    }

    fn mark_accessed(&mut self, folio: &Folio) {
        if let Some(h) = self.head(folio) {
            self.pages[h].accessed = true;
        }
    }

    fn swap_dup(&mut self, _pte: u64) -> Result<(), SwapCountFull> {
        if self.swap_full > 0 {
            self.swap_full -= 1;
            return Err(SwapCountFull);
        }
        self.swap_refs += 1;
        Ok(())
    }

    fn swap_count_continuation(&mut self, _pte: u64) -> Result<(), Error> {
        if let Some(b) = &mut self.alloc_budget {
            *b = b.checked_sub(1).ok_or(Error::NoMemory)?;
        }
        self.continuations += 1;
        Ok(())
    }

    fn restore_device_exclusive(&mut self, _pfn: u64) -> bool {
        self.restores += u64::from(self.restore_exclusive);
        self.restore_exclusive
    }

    fn swap_free(&mut self, _pte: u64) {
        self.swap_refs -= 1;
    }
}

impl PageAlloc for SimFolios<'_> {
    fn alloc_page(&mut self) -> Option<u64> {
        if let Some(b) = &mut self.alloc_budget {
            *b = b.checked_sub(1)?;
        }
        let n = self.pages.len();
        for k in 0..n {
            let i = (self.cursor + k) % n;
            if !self.pages[i].used {
                self.cursor = (i + 1) % n;
                let pfn = self.base_pfn + i as u64;
                self.pages[i] = SimPage {
                    used: true,
                    head: pfn,
                    refcount: 1,
                    ..SimPage::default()
                };
                return Some(pfn);
            }
        }
        None
    }

    fn free_page(&mut self, pfn: u64) {
        if let Some(i) = self.idx(pfn) {
            self.pages[i] = SimPage::default();
            self.frees += 1;
        }
    }

    fn copy_page(&mut self, dst: u64, src: u64) -> Result<(), Error> {
        let (Some(d), Some(s)) = (self.idx(dst), self.idx(src)) else {
            return Err(Error::HardwarePoison);
        };
        if self.pages[s].poisoned {
            return Err(Error::HardwarePoison);
        }
        self.pages[d].data = self.pages[s].data;
        Ok(())
    }
}
