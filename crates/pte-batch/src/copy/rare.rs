//! The rare entries of a fork's copy, out of the hot loop: non-present entries, and the child's
//! own copy of a possibly pinned anon page with the page preallocated for it.

use super::{Fork, Hot};
use crate::Error;
use crate::hal::{FolioOps, PageAlloc, PageTable, PteFormat};

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

    /// A swap entry: one more reference to the swap slot; uffd-wp only if the child keeps it.
    #[inline(never)]
    pub(super) fn copy_nonpresent_pte<D: PageTable>(
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
