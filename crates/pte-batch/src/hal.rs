//! The small traits the batching is written against: the PTE encoding, access to a last-level
//! page table, folio metadata and a page allocator.
//!
//! A kernel implements [`PageTable`] over its page tables (or uses [`x86::X86PageTables`] /
//! [`sim::SimSpace`]), [`FolioOps`] and [`PageAlloc`] over its `struct page` array, and picks a
//! [`PteFormat`] ([`X86Pte`](crate::format::X86Pte) or [`Arm64Pte`](crate::format::Arm64Pte)).
//!
//! [`x86::X86PageTables`]: crate#real-x86-64-backend
//! [`sim::SimSpace`]: crate::sim::SimSpace

use crate::Error;

/// Bytes per base page.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// Entries in one last-level page table (4 KiB table of 8-byte entries).
pub const PTRS_PER_TABLE: usize = 512;
/// Bytes of address space one last-level table maps (2 MiB).
pub const TABLE_SPAN: u64 = PAGE_SIZE * PTRS_PER_TABLE as u64;

/// The first address after the last-level table that maps `addr`, or `None` at the top of the
/// address space.
pub const fn table_end(addr: u64) -> Option<u64> {
    (addr & !(TABLE_SPAN - 1)).checked_add(TABLE_SPAN)
}

/// How one architecture encodes a last-level page-table entry (a raw `u64`).
///
/// All functions are pure bit manipulation and total: any `u64` is accepted, because table
/// contents are untrusted. "Present" follows Linux's `pte_present()`: a PROT_NONE (NUMA hinting)
/// entry is present even though the MMU will fault on it.
pub trait PteFormat {
    /// Base protection of a fresh, user-accessible, read-only, accessed page (PFN 0): what
    /// `vm_page_prot` holds for a private read/write mapping.
    const USER_READONLY: u64;

    /// Whether the slot is empty (`pte_none`).
    fn is_none(pte: u64) -> bool {
        pte == 0
    }
    /// Whether the entry maps a page (valid, or PROT_NONE).
    fn is_present(pte: u64) -> bool;
    /// Whether the entry is a PROT_NONE (NUMA-hinting) mapping: present for the kernel, faulting
    /// for the MMU.
    fn is_protnone(pte: u64) -> bool;
    /// Whether writes are allowed.
    fn is_writable(pte: u64) -> bool;
    /// Whether the page was written through this entry.
    fn is_dirty(pte: u64) -> bool;
    /// Whether the entry was used since the bit was last cleared (accessed).
    fn is_young(pte: u64) -> bool;
    /// The soft-dirty tracking bit.
    fn is_soft_dirty(pte: u64) -> bool;
    /// The userfaultfd write-protect bit of a present entry.
    fn is_uffd_wp(pte: u64) -> bool;
    /// Whether the entry maps memory without a `struct page` (`pte_special`).
    fn is_special(pte: u64) -> bool;
    /// The page frame number the entry maps.
    fn pfn(pte: u64) -> u64;
    /// The same entry with its PFN replaced (excess PFN bits are dropped).
    fn with_pfn(pte: u64, pfn: u64) -> u64;
    /// The same entry pointing `nr` frames further on (`pte_advance_pfn`).
    ///
    /// As in Linux, the PFN is a plain field: while `pfn(pte) + nr` fits, advancing by `nr`
    /// adds `nr` times what advancing by one adds (`advance_pfn(pte, nr) == pte + nr *
    /// (advance_pfn(pte, 1) - pte)`, wrapping). The batching relies on it to step through a
    /// folio's entries by adding a constant.
    fn advance_pfn(pte: u64, nr: u64) -> u64 {
        Self::with_pfn(pte, Self::pfn(pte).wrapping_add(nr))
    }
    /// Everything but the PFN: two entries with equal protection map their pages the same way.
    fn protection(pte: u64) -> u64 {
        Self::with_pfn(pte, 0)
    }
    /// Whether two entries have the same protection (`pte_pgprot(a) == pte_pgprot(b)`).
    fn same_protection(a: u64, b: u64) -> bool {
        Self::protection(a) == Self::protection(b)
    }
    /// Clears the accessed bit.
    fn mkold(pte: u64) -> u64;
    /// Sets the accessed bit.
    fn mkyoung(pte: u64) -> u64;
    /// Clears the dirty state.
    fn mkclean(pte: u64) -> u64;
    /// Sets the dirty state.
    fn mkdirty(pte: u64) -> u64;
    /// Removes write permission.
    fn wrprotect(pte: u64) -> u64;
    /// Grants write permission.
    fn mkwrite(pte: u64) -> u64;
    /// Clears the soft-dirty bit.
    fn clear_soft_dirty(pte: u64) -> u64;
    /// Sets the soft-dirty bit.
    fn mk_soft_dirty(pte: u64) -> u64;
    /// Sets the userfaultfd write-protect bit of a present entry.
    fn mk_uffd_wp(pte: u64) -> u64;
    /// Clears the userfaultfd write-protect bit of a present entry.
    fn clear_uffd_wp(pte: u64) -> u64;
    /// The userfaultfd write-protect bit of a non-present (swap) entry.
    fn swp_is_uffd_wp(pte: u64) -> bool;
    /// Clears the userfaultfd write-protect bit of a non-present (swap) entry.
    fn swp_clear_uffd_wp(pte: u64) -> u64;
    /// Sets the userfaultfd write-protect bit of a non-present (swap) entry.
    fn swp_mk_uffd_wp(pte: u64) -> u64;
    /// A non-present entry of swap type `ty` (0-31: see [`crate::nonpresent`]) and `offset`
    /// (`swp_entry_to_pte(swp_entry(ty, offset))`), no flag bits set. Bits of `ty` above the
    /// 5-bit field and of `offset` above the format's offset field are dropped.
    fn mk_swp_entry(ty: u32, offset: u64) -> u64;
    /// The swap type of a non-present entry (`swp_type`), 0-31.
    fn swp_type(pte: u64) -> u32;
    /// The offset of a non-present entry (`swp_offset`): a slot, a PFN or marker bits.
    fn swp_offset(pte: u64) -> u64;
    /// The anon-exclusive bit of a swap entry (`pte_swp_exclusive`).
    fn swp_is_exclusive(pte: u64) -> bool;
    /// Sets the anon-exclusive bit of a swap entry (`pte_swp_mkexclusive`).
    fn swp_mk_exclusive(pte: u64) -> u64;
    /// Clears the anon-exclusive bit of a swap entry (`pte_swp_clear_exclusive`).
    fn swp_clear_exclusive(pte: u64) -> u64;
    /// The soft-dirty bit of a non-present entry (`pte_swp_soft_dirty`).
    fn swp_is_soft_dirty(pte: u64) -> bool;
    /// Sets the soft-dirty bit of a non-present entry (`pte_swp_mksoft_dirty`).
    fn swp_mk_soft_dirty(pte: u64) -> u64;
}

/// Access to last-level page-table entries, addressed by the virtual address they map.
///
/// The copy and zap loops never let a batch cross a [`TABLE_SPAN`] boundary, so an implementation
/// may resolve the table once per call. Addresses are page aligned. An address the
/// implementation has no table for reads as none and ignores writes (never panics).
///
/// The default methods are the generic one-entry-at-a-time versions; a backend overrides them
/// where it can do better (the contiguous-bit backend folds, and write-protects whole blocks
/// without unfolding them).
pub trait PageTable {
    /// The entry encoding.
    type Format: PteFormat;

    /// Reads the entry mapping `addr` (`ptep_get`). A backend that hides hardware details (the
    /// contiguous bit) returns the entry as if they were absent, with accessed/dirty gathered.
    fn get(&self, addr: u64) -> u64;
    /// Writes the entry mapping `addr` (`set_pte_at`).
    fn set(&mut self, addr: u64, pte: u64);

    /// Reads the `out.len()` entries from `addr` on into `out` (`ptep_get` of each; the caller
    /// keeps them in one table). A backend over plain memory overrides it with one copy.
    fn get_many(&self, addr: u64, out: &mut [u64]) {
        for (i, e) in out.iter_mut().enumerate() {
            *e = self.get(addr + i as u64 * PAGE_SIZE);
        }
    }
    /// The raw values of the `nr` entries from `addr` (in one table), when the table is plain
    /// memory whose raw words are what [`get`](Self::get) returns and that nothing else writes
    /// while the caller holds it. The batch scan then compares the words in place. The default,
    /// `None`, makes it read through [`get_many`](Self::get_many) (hardware tables the MMU
    /// updates concurrently, or a backend that hides bits such as the contiguous bit).
    fn raw_entries(&self, addr: u64, nr: usize) -> Option<&[u64]> {
        let _ = (addr, nr);
        None
    }
    /// The `nr` entries from `addr` (in one table) as atomics, when the table is memory the MMU
    /// may update concurrently (accessed/dirty) and whose words are what [`get`](Self::get)
    /// returns: the batch scan then compares them in place with relaxed loads, without copying.
    /// The default, `None`, makes it use [`raw_entries`](Self::raw_entries) or
    /// [`get_many`](Self::get_many).
    fn atomic_entries(&self, addr: u64, nr: usize) -> Option<&[core::sync::atomic::AtomicU64]> {
        let _ = (addr, nr);
        None
    }
    /// The entry mapping `addr` (as [`get`](Self::get)) and how many entries from `addr` (at
    /// least 1, in one table) the backend knows map consecutive frames alike
    /// (`pte_batch_hint`: the rest of a folded contiguous block). The batch scan compares the
    /// entry and skips the rest of the run. The default knows nothing: `(get(addr), 1)`.
    fn get_run(&self, addr: u64) -> (u64, usize) {
        (self.get(addr), 1)
    }
    /// Maps `nr` consecutive pages: entry `i` is `pte` advanced by `i` frames (`set_ptes`). The
    /// caller guarantees the frames belong to one folio.
    fn set_ptes(&mut self, addr: u64, pte: u64, nr: usize) {
        for i in 0..nr as u64 {
            self.set(addr + i * PAGE_SIZE, <Self::Format>::advance_pfn(pte, i));
        }
    }
    /// Removes write permission from `nr` entries (`wrprotect_ptes`). No TLB flush: the caller
    /// flushes.
    fn wrprotect_ptes(&mut self, addr: u64, nr: usize) {
        for i in 0..nr as u64 {
            let a = addr + i * PAGE_SIZE;
            let pte = self.get(a);
            if <Self::Format>::is_writable(pte) {
                self.set(a, <Self::Format>::wrprotect(pte));
            }
        }
    }
    /// Clears the entry and returns its last value (`ptep_get_and_clear`); on real hardware this
    /// is atomic so an accessed/dirty update by the MMU is not lost.
    fn get_and_clear(&mut self, addr: u64) -> u64 {
        let pte = self.get(addr);
        self.set(addr, 0);
        pte
    }
    /// Clears `nr` entries mapping consecutive pages of one folio and returns the first one with
    /// the dirty and accessed state of all of them (`get_and_clear_full_ptes`).
    fn get_and_clear_ptes(&mut self, addr: u64, nr: usize) -> u64 {
        let mut first = self.get_and_clear(addr);
        for i in 1..nr as u64 {
            let pte = self.get_and_clear(addr + i * PAGE_SIZE);
            if <Self::Format>::is_dirty(pte) {
                first = <Self::Format>::mkdirty(first);
            }
            if <Self::Format>::is_young(pte) {
                first = <Self::Format>::mkyoung(first);
            }
        }
        first
    }
    /// Invalidates cached translations of `[start, end)`.
    fn flush_tlb_range(&mut self, start: u64, end: u64);
    /// Starts a run of entry updates that may be deferred until [`lazy_mmu_leave`](Self::lazy_mmu_leave)
    /// (`arch_enter_lazy_mmu_mode`).
    fn lazy_mmu_enter(&mut self) {}
    /// Ends a run started by [`lazy_mmu_enter`](Self::lazy_mmu_enter); deferred updates land.
    fn lazy_mmu_leave(&mut self) {}
    /// Whether a last-level table exists for `addr` (a source without one is skipped).
    fn has_table(&self, addr: u64) -> bool {
        let _ = addr;
        true
    }
    /// Whether a huge leaf entry at an upper level (an x86 PS entry in the PD or PDPT, a PMD- or
    /// PUD-mapped THP) maps `addr` where [`has_table`](Self::has_table) found no last-level
    /// table. Copy and zap fail with [`Error::HugeMapping`] there rather than skip it. The
    /// default has no huge entries.
    fn is_huge(&self, addr: u64) -> bool {
        let _ = addr;
        false
    }
    /// Makes sure a last-level table exists for `addr`, allocating it and any missing upper
    /// levels (`pte_alloc`). [`Error::HugeMapping`] when a huge entry is in the way.
    fn prepare(&mut self, addr: u64) -> Result<(), Error> {
        let _ = addr;
        Ok(())
    }
}

impl<T: PageTable + ?Sized> PageTable for &mut T {
    type Format = T::Format;
    fn get(&self, addr: u64) -> u64 {
        (**self).get(addr)
    }
    fn set(&mut self, addr: u64, pte: u64) {
        (**self).set(addr, pte)
    }
    fn get_many(&self, addr: u64, out: &mut [u64]) {
        (**self).get_many(addr, out)
    }
    fn raw_entries(&self, addr: u64, nr: usize) -> Option<&[u64]> {
        (**self).raw_entries(addr, nr)
    }
    fn atomic_entries(&self, addr: u64, nr: usize) -> Option<&[core::sync::atomic::AtomicU64]> {
        (**self).atomic_entries(addr, nr)
    }
    fn get_run(&self, addr: u64) -> (u64, usize) {
        (**self).get_run(addr)
    }
    fn set_ptes(&mut self, addr: u64, pte: u64, nr: usize) {
        (**self).set_ptes(addr, pte, nr)
    }
    fn wrprotect_ptes(&mut self, addr: u64, nr: usize) {
        (**self).wrprotect_ptes(addr, nr)
    }
    fn get_and_clear(&mut self, addr: u64) -> u64 {
        (**self).get_and_clear(addr)
    }
    fn get_and_clear_ptes(&mut self, addr: u64, nr: usize) -> u64 {
        (**self).get_and_clear_ptes(addr, nr)
    }
    fn flush_tlb_range(&mut self, start: u64, end: u64) {
        (**self).flush_tlb_range(start, end)
    }
    fn lazy_mmu_enter(&mut self) {
        (**self).lazy_mmu_enter()
    }
    fn lazy_mmu_leave(&mut self) {
        (**self).lazy_mmu_leave()
    }
    fn has_table(&self, addr: u64) -> bool {
        (**self).has_table(addr)
    }
    fn is_huge(&self, addr: u64) -> bool {
        (**self).is_huge(addr)
    }
    fn prepare(&mut self, addr: u64) -> Result<(), Error> {
        (**self).prepare(addr)
    }
}

/// A folio as the batching sees it: a naturally sized run of `nr_pages` frames starting at `pfn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Folio {
    /// First frame of the folio.
    pub pfn: u64,
    /// Frames in the folio (`1 << order`).
    pub nr_pages: u64,
    /// Anonymous memory (else page cache / file-backed).
    pub anon: bool,
}

impl Folio {
    /// More than one page.
    pub const fn is_large(&self) -> bool {
        self.nr_pages > 1
    }
    /// One past the last frame (saturating).
    pub const fn end_pfn(&self) -> u64 {
        self.pfn.saturating_add(self.nr_pages)
    }
    /// Whether `pfn` lies in the folio.
    pub const fn contains(&self, pfn: u64) -> bool {
        pfn >= self.pfn && pfn < self.end_pfn()
    }
}

/// `try_dup_anon_rmap` refused: the folio may be DMA-pinned and a page in the range is
/// anon-exclusive, so the child must get a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaybePinned;

/// Folio metadata: the kernel's `struct page` / `struct folio` array.
///
/// `pfn` arguments name a page inside `folio`, and the `nr` pages from it lie inside the folio
/// (the batching guarantees it).
pub trait FolioOps {
    /// The folio of a mapped frame (`vm_normal_page` + `page_folio`), or `None` for a frame with
    /// no `struct page` (MMIO, a PFN mapping).
    fn folio(&self, pfn: u64) -> Option<Folio>;
    /// Takes `nr` references on the folio (`folio_ref_add`).
    fn ref_add(&mut self, folio: &Folio, nr: usize);
    /// Drops `nr` references (`folio_ref_sub` / `folio_put_refs`); the last one frees it.
    fn ref_sub(&mut self, folio: &Folio, nr: usize);
    /// Duplicates the anon mappings of `nr` pages from `pfn` for a child
    /// (`folio_try_dup_anon_rmap_ptes`). Fails, changing nothing, when the folio may be
    /// DMA-pinned and any of the pages is anon-exclusive; otherwise clears their anon-exclusive
    /// flags and raises their mapcounts by one.
    fn try_dup_anon_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize) -> Result<(), MaybePinned>;
    /// Duplicates the file mappings of `nr` pages from `pfn` (`folio_dup_file_rmap_ptes`).
    fn dup_file_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize);
    /// Removes one mapping of each of `nr` pages from `pfn` (`folio_remove_rmap_ptes`).
    fn remove_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize);
    /// Makes a freshly allocated page (from [`PageAlloc::alloc_page`]) an order-0 anon folio
    /// mapped once, exclusively, holding the allocation's reference (`folio_add_new_anon_rmap`).
    fn add_new_anon_rmap(&mut self, pfn: u64);
    /// How many page-table entries map the page.
    fn mapcount(&self, pfn: u64) -> usize;
    /// Whether the anon page is exclusive to one process (`PageAnonExclusive`).
    fn is_anon_exclusive(&self, pfn: u64) -> bool;
    /// The folio was written through a zapped entry (`folio_mark_dirty`).
    fn mark_dirty(&mut self, folio: &Folio) {
        let _ = folio;
    }
    /// The folio was accessed through a zapped entry (`folio_mark_accessed`).
    fn mark_accessed(&mut self, folio: &Folio) {
        let _ = folio;
    }
    /// The swap entry `pte` (a [`NonPresent::Swap`](crate::NonPresent::Swap)) is being
    /// duplicated into a child: one more reference on its slot (`swap_duplicate`).
    ///
    /// Called with the page-table lock held and in lazy-MMU mode: must not sleep.
    /// [`SwapCountFull`] when the slot's count needs a continuation page that cannot be
    /// allocated without sleeping; the copy then calls
    /// [`swap_count_continuation`](Self::swap_count_continuation) and tries again. The default
    /// keeps no swap counts.
    fn swap_dup(&mut self, pte: u64) -> Result<(), SwapCountFull> {
        let _ = pte;
        Ok(())
    }
    /// Makes room for one more reference on the slot of the swap entry `pte`
    /// (`add_swap_count_continuation` with `GFP_KERNEL`). Called outside lazy-MMU mode, where
    /// the kernel may drop its page-table lock and sleep. [`Error::NoMemory`] ends the copy.
    fn swap_count_continuation(&mut self, pte: u64) -> Result<(), Error> {
        let _ = pte;
        Err(Error::NoMemory)
    }
    /// The swap entry `pte` is being zapped: drop its reference on the slot
    /// (`free_swap_and_cache`). Must not sleep.
    fn swap_free(&mut self, pte: u64) {
        let _ = pte;
    }
    /// The swap entries `ptes` are being zapped: drop each one's reference on its slot
    /// (`free_swap_and_cache_nr`). They are one run, as a swapped-out large folio leaves
    /// them: the same swap device, consecutive slots from `ptes[0]`'s, the same flag bits
    /// (at most [`SWAP_BATCH`](crate::zap::SWAP_BATCH) of them, never across a page table).
    /// A backend can free the run under one lock of the device. Must not sleep. The default
    /// calls [`swap_free`](Self::swap_free) for each.
    fn swap_free_batch(&mut self, ptes: &[u64]) {
        for &pte in ptes {
            self.swap_free(pte);
        }
    }
    /// A fork met a device-exclusive entry for page `pfn`: revoke the device's exclusive
    /// access (the MMU notifier of `restore_exclusive_pte`) and return true, after which the
    /// copy maps the page again in the parent and copies it as a present page. The default,
    /// false, has no device to ask: the copy fails with
    /// [`Error::DeviceExclusive`]. Must not sleep.
    fn restore_device_exclusive(&mut self, pfn: u64) -> bool {
        let _ = pfn;
        false
    }
}

/// `swap_duplicate` needs a swap-count continuation page it cannot allocate atomically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwapCountFull;

/// Pages for the children's private copies of possibly pinned pages.
pub trait PageAlloc {
    /// A free frame, or `None` when memory is exhausted.
    fn alloc_page(&mut self) -> Option<u64>;
    /// Returns a frame from [`alloc_page`](Self::alloc_page) that was never mapped.
    fn free_page(&mut self, pfn: u64);
    /// Copies the contents of frame `src` into frame `dst`
    /// ([`Error::HardwarePoison`] when `src` cannot be read).
    fn copy_page(&mut self, dst: u64, src: u64) -> Result<(), Error>;
}

impl<T: FolioOps + ?Sized> FolioOps for &mut T {
    fn folio(&self, pfn: u64) -> Option<Folio> {
        (**self).folio(pfn)
    }
    fn ref_add(&mut self, folio: &Folio, nr: usize) {
        (**self).ref_add(folio, nr)
    }
    fn ref_sub(&mut self, folio: &Folio, nr: usize) {
        (**self).ref_sub(folio, nr)
    }
    fn try_dup_anon_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize) -> Result<(), MaybePinned> {
        (**self).try_dup_anon_rmap(folio, pfn, nr)
    }
    fn dup_file_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize) {
        (**self).dup_file_rmap(folio, pfn, nr)
    }
    fn remove_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize) {
        (**self).remove_rmap(folio, pfn, nr)
    }
    fn add_new_anon_rmap(&mut self, pfn: u64) {
        (**self).add_new_anon_rmap(pfn)
    }
    fn mapcount(&self, pfn: u64) -> usize {
        (**self).mapcount(pfn)
    }
    fn is_anon_exclusive(&self, pfn: u64) -> bool {
        (**self).is_anon_exclusive(pfn)
    }
    fn mark_dirty(&mut self, folio: &Folio) {
        (**self).mark_dirty(folio)
    }
    fn mark_accessed(&mut self, folio: &Folio) {
        (**self).mark_accessed(folio)
    }
    fn swap_dup(&mut self, pte: u64) -> Result<(), SwapCountFull> {
        (**self).swap_dup(pte)
    }
    fn swap_count_continuation(&mut self, pte: u64) -> Result<(), Error> {
        (**self).swap_count_continuation(pte)
    }
    fn swap_free(&mut self, pte: u64) {
        (**self).swap_free(pte)
    }
    fn swap_free_batch(&mut self, ptes: &[u64]) {
        (**self).swap_free_batch(ptes)
    }
    fn restore_device_exclusive(&mut self, pfn: u64) -> bool {
        (**self).restore_device_exclusive(pfn)
    }
}

impl<T: PageAlloc + ?Sized> PageAlloc for &mut T {
    fn alloc_page(&mut self) -> Option<u64> {
        (**self).alloc_page()
    }
    fn free_page(&mut self, pfn: u64) {
        (**self).free_page(pfn)
    }
    fn copy_page(&mut self, dst: u64, src: u64) -> Result<(), Error> {
        (**self).copy_page(dst, src)
    }
}
