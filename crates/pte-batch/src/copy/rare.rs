//! The rare entries of a fork's copy, out of the hot loop: non-present entries, and the child's
//! own copy of a possibly pinned anon page with the page preallocated for it.

use super::{Fork, Hot, dup_folio};
use crate::Error;
use crate::hal::{FolioOps, PageAlloc, PageTable, PteFormat};
use crate::nonpresent::{Markers, Migration, NonPresent, keep_swp_bits};
use crate::vma::Vma;

impl<M: FolioOps + PageAlloc> Fork<'_, M> {
    /// Holds `pfn` (a page from [`PageAlloc::alloc_page`]) for the next possibly pinned page.
    /// A page already held is freed.
    pub fn preallocate(&mut self, pfn: u64) {
        if let Some(old) = self.prealloc.replace(pfn) {
            self.mem.free_page(old);
        }
    }

    #[cold]
    #[inline(never)]
    pub(super) fn drop_prealloc(&mut self) {
        if let Some(p) = self.prealloc.take() {
            self.mem.free_page(p);
        }
    }

    /// The child gets its own copy of a possibly pinned anon page (`copy_present_page`).
    #[cold]
    #[inline(never)]
    pub(super) fn copy_present_page<D: PageTable>(
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

    /// A non-present entry (`copy_nonpresent_pte`), by what it stands for:
    ///
    /// - swap: one more reference on the slot (`swap_duplicate`; on [`SwapCountFull`] the
    ///   continuation is added outside lazy-MMU mode and the entry retried); an exclusive entry
    ///   is made shared in the parent and the child;
    /// - migration: counted in the child's RSS; a write or read-exclusive entry becomes a read
    ///   entry in the parent and the child of a COW mapping (soft-dirty and uffd-wp kept);
    /// - device-private: a reference and an rmap duplicate like a present page (RSS too); a
    ///   writable entry becomes readable in both in a COW mapping;
    /// - device-exclusive: [`FolioOps::restore_device_exclusive`], then the parent maps the
    ///   page again and the entry is retried as a present one; [`Error::DeviceExclusive`]
    ///   when nothing restores it;
    /// - hwpoison: copied;
    /// - marker: poisoned and guard markers copied, uffd-wp only into a uffd-wp child.
    ///
    /// The child loses uffd-wp unless its VMA keeps it. Returns the entries copied: 1, or 0
    /// when the entry must be read again.
    ///
    /// [`SwapCountFull`]: crate::SwapCountFull
    #[inline(never)]
    pub(super) fn copy_nonpresent_pte<D, S>(
        &mut self,
        dst: &mut D,
        src: &mut S,
        addr: u64,
        pte: u64,
        hot: &mut Hot,
    ) -> Result<usize, Error>
    where
        D: PageTable,
        S: PageTable<Format = D::Format>,
    {
        type F<D> = <D as PageTable>::Format;
        let cow = self.src.is_cow();
        let mut child = pte;
        match NonPresent::decode::<F<D>>(pte) {
            NonPresent::Swap { exclusive, .. } => {
                if self.mem.swap_dup(pte).is_err() {
                    dst.lazy_mmu_leave();
                    src.lazy_mmu_leave();
                    let room = self.mem.swap_count_continuation(pte);
                    src.lazy_mmu_enter();
                    dst.lazy_mmu_enter();
                    room?;
                    return Ok(0);
                }
                if exclusive {
                    // Both may map the page after swap-in: neither may reuse it without COW.
                    child = F::<D>::swp_clear_exclusive(pte);
                    src.set(addr, child);
                }
                hot.rss.swap += 1;
            }
            NonPresent::Migration { pfn, kind } => {
                if let Some(folio) = self.mem.folio(pfn).filter(|f| f.contains(pfn)) {
                    if folio.anon {
                        hot.rss.anon += 1;
                    } else {
                        hot.rss.file += 1;
                    }
                }
                if kind != Migration::Read && cow {
                    let read = NonPresent::Migration {
                        pfn,
                        kind: Migration::Read,
                    };
                    child = keep_swp_bits::<F<D>>(pte, read.encode::<F<D>>());
                    src.set(addr, child);
                }
            }
            NonPresent::DevicePrivate { pfn, write } => {
                if let Some(folio) = self.mem.folio(pfn).filter(|f| f.contains(pfn)) {
                    // Device-private pages cannot be pinned: a refusal is corrupt metadata.
                    if !dup_folio(&mut *self.mem, &mut hot.rss, &folio, pfn, 1) {
                        return Err(Error::InvalidEntry { addr });
                    }
                }
                if write && cow {
                    let read = NonPresent::DevicePrivate { pfn, write: false };
                    child = keep_swp_bits::<F<D>>(pte, read.encode::<F<D>>());
                    src.set(addr, child);
                }
            }
            NonPresent::DeviceExclusive { pfn } => {
                if !self.mem.restore_device_exclusive(pfn) {
                    return Err(Error::DeviceExclusive { addr });
                }
                src.set(addr, restored_pte::<F<D>>(self.src, pte, pfn));
                return Ok(0);
            }
            NonPresent::Hwpoison { .. } => {}
            NonPresent::Marker(m) => {
                let mut keep = m & (Markers::POISONED | Markers::GUARD);
                if m.contains(Markers::UFFD_WP) && self.dst.uffd_wp() {
                    keep |= Markers::UFFD_WP;
                }
                if !keep.is_empty() {
                    dst.set(addr, NonPresent::Marker(keep).encode::<F<D>>());
                }
                hot.nonpresent += 1;
                return Ok(1);
            }
        }
        if !self.dst.uffd_wp() {
            child = F::<D>::swp_clear_uffd_wp(child);
        }
        dst.set(addr, child);
        hot.nonpresent += 1;
        Ok(1)
    }
}

/// The present entry a device-exclusive entry `pte` of page `pfn` turns back into
/// (`restore_exclusive_pte`): the VMA's protection, old, dirty, writable if the VMA is (and the
/// entry is not uffd-wp), soft-dirty and uffd-wp carried over.
pub(crate) fn restored_pte<F: PteFormat>(vma: Vma, pte: u64, pfn: u64) -> u64 {
    let mut p = F::mkdirty(F::mkold(F::with_pfn(vma.page_prot, pfn)));
    if !F::swp_is_soft_dirty(pte) {
        p = F::clear_soft_dirty(p);
    }
    if F::swp_is_uffd_wp(pte) {
        p = F::mk_uffd_wp(p);
    } else if vma.is_writable() {
        p = F::mkwrite(p);
    }
    p
}
