//! The per-PTE reference: copy and zap one entry at a time, with Linux's semantics from before
//! batching (`copy_present_pte` of 6.8). The property tests and the fuzz target compare the
//! batched code against it, and the benchmarks measure against it.
//!
//! It shares no code with [`Fork`](crate::Fork) and [`Zap`](crate::Zap) beyond the traits.

use crate::hal::{
    Folio, FolioOps, PAGE_SIZE, PTRS_PER_TABLE, PageAlloc, PageTable, PteFormat, table_end,
};
use crate::nonpresent::{self, Markers, Migration, NonPresent};
use crate::vma::{Rss, Vma};
use crate::{Error, check_range};

/// Copies `[start, end)` from `src` into `dst` one entry at a time, adding the child's RSS to
/// `rss`. A possibly pinned anon page is copied into a page allocated on the spot.
#[allow(clippy::too_many_arguments)]
pub fn copy_range<D, S, M>(
    dst: &mut D,
    src: &mut S,
    mem: &mut M,
    src_vma: Vma,
    dst_vma: Vma,
    start: u64,
    end: u64,
    rss: &mut Rss,
) -> Result<(), Error>
where
    D: PageTable,
    S: PageTable<Format = D::Format>,
    M: FolioOps + PageAlloc,
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
            let mut wp: Option<(u64, u64)> = None;
            let mut a = addr;
            let mut result = Ok(());
            while a < next {
                if let Err(e) =
                    copy_one::<D, S, M>(dst, src, mem, src_vma, dst_vma, a, rss, &mut wp)
                {
                    result = Err(e);
                    break;
                }
                a += PAGE_SIZE;
            }
            if let Some((s, e)) = wp {
                src.flush_tlb_range(s, e);
            }
            result?;
        }
        addr = next;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn copy_one<D, S, M>(
    dst: &mut D,
    src: &mut S,
    mem: &mut M,
    src_vma: Vma,
    dst_vma: Vma,
    addr: u64,
    rss: &mut Rss,
    wp: &mut Option<(u64, u64)>,
) -> Result<(), Error>
where
    D: PageTable,
    S: PageTable<Format = D::Format>,
    M: FolioOps + PageAlloc,
{
    type F<D> = <D as PageTable>::Format;
    let mut pte = src.get(addr);
    if F::<D>::is_none(pte) {
        return Ok(());
    }
    if !F::<D>::is_present(pte) {
        if let Some(present) =
            copy_nonpresent::<D, S, M>(dst, src, mem, src_vma, dst_vma, addr, pte, rss)?
        {
            pte = present;
        } else {
            return Ok(());
        }
    }
    let pfn = F::<D>::pfn(pte);
    let folio = if F::<D>::is_special(pte) {
        None
    } else {
        mem.folio(pfn).filter(|f| f.contains(pfn))
    };
    if let Some(folio) = folio {
        mem.ref_add(&folio, 1);
        if folio.anon {
            if mem.try_dup_anon_rmap(&folio, pfn, 1).is_err() {
                mem.ref_sub(&folio, 1);
                return copy_page_for_child::<D, M>(dst, mem, dst_vma, addr, pte, rss);
            }
            rss.anon += 1;
        } else {
            mem.dup_file_rmap(&folio, pfn, 1);
            rss.file += 1;
        }
    }
    if src_vma.is_cow() && F::<D>::is_writable(pte) {
        // The backend's write-protect of one entry (`ptep_set_wrprotect`): atomic on real
        // hardware, so the MMU's accessed/dirty updates are kept.
        src.wrprotect_ptes(addr, 1);
        let e = addr + PAGE_SIZE;
        *wp = Some(wp.map_or((addr, e), |(s, _)| (s, e)));
        pte = F::<D>::wrprotect(pte);
    }
    if src_vma.is_shared() {
        pte = F::<D>::mkclean(pte);
    }
    pte = F::<D>::mkold(pte);
    if !dst_vma.uffd_wp() {
        pte = F::<D>::clear_uffd_wp(pte);
    }
    dst.set(addr, pte);
    Ok(())
}

/// One non-present entry; `Some(pte)` when it was a device-exclusive entry turned back into the
/// present `pte`, to copy as such.
#[allow(clippy::too_many_arguments)]
fn copy_nonpresent<D, S, M>(
    dst: &mut D,
    src: &mut S,
    mem: &mut M,
    src_vma: Vma,
    dst_vma: Vma,
    addr: u64,
    pte: u64,
    rss: &mut Rss,
) -> Result<Option<u64>, Error>
where
    D: PageTable,
    S: PageTable<Format = D::Format>,
    M: FolioOps + PageAlloc,
{
    type F<D> = <D as PageTable>::Format;
    let kind = NonPresent::decode::<F<D>>(pte);
    let folio = kind
        .pfn()
        .and_then(|pfn| mem.folio(pfn).filter(|f| f.contains(pfn)));
    let mut new = pte;
    match kind {
        NonPresent::Swap { .. } => {
            while mem.swap_dup(pte).is_err() {
                mem.swap_count_continuation(pte)?;
            }
            rss.swap += 1;
            if F::<D>::swp_is_exclusive(pte) {
                new = F::<D>::swp_clear_exclusive(pte);
                src.set(addr, new);
            }
        }
        NonPresent::Migration { pfn, kind } => {
            if let Some(f) = folio {
                if f.anon {
                    rss.anon += 1;
                } else {
                    rss.file += 1;
                }
            }
            if kind != Migration::Read && src_vma.is_cow() {
                new = F::<D>::mk_swp_entry(nonpresent::SWP_MIGRATION_READ, pfn);
                if F::<D>::swp_is_soft_dirty(pte) {
                    new = F::<D>::swp_mk_soft_dirty(new);
                }
                if F::<D>::swp_is_uffd_wp(pte) {
                    new = F::<D>::swp_mk_uffd_wp(new);
                }
                src.set(addr, new);
            }
        }
        NonPresent::DevicePrivate { pfn, write } => {
            if let Some(f) = folio {
                mem.ref_add(&f, 1);
                if f.anon {
                    if mem.try_dup_anon_rmap(&f, pfn, 1).is_err() {
                        mem.ref_sub(&f, 1);
                        return Err(Error::InvalidEntry { addr });
                    }
                    rss.anon += 1;
                } else {
                    mem.dup_file_rmap(&f, pfn, 1);
                    rss.file += 1;
                }
            }
            if write && src_vma.is_cow() {
                new = F::<D>::mk_swp_entry(nonpresent::SWP_DEVICE_READ, pfn);
                if F::<D>::swp_is_soft_dirty(pte) {
                    new = F::<D>::swp_mk_soft_dirty(new);
                }
                if F::<D>::swp_is_uffd_wp(pte) {
                    new = F::<D>::swp_mk_uffd_wp(new);
                }
                src.set(addr, new);
            }
        }
        NonPresent::DeviceExclusive { pfn } => {
            if !mem.restore_device_exclusive(pfn) {
                return Err(Error::DeviceExclusive { addr });
            }
            let mut p = F::<D>::mkdirty(F::<D>::mkold(F::<D>::with_pfn(src_vma.page_prot, pfn)));
            if !F::<D>::swp_is_soft_dirty(pte) {
                p = F::<D>::clear_soft_dirty(p);
            }
            if F::<D>::swp_is_uffd_wp(pte) {
                p = F::<D>::mk_uffd_wp(p);
            } else if src_vma.is_writable() {
                p = F::<D>::mkwrite(p);
            }
            src.set(addr, p);
            return Ok(Some(p));
        }
        NonPresent::Hwpoison { .. } => {}
        NonPresent::Marker(m) => {
            let mut keep = m & (Markers::POISONED | Markers::GUARD);
            if dst_vma.uffd_wp() {
                keep |= m & Markers::UFFD_WP;
            }
            if !keep.is_empty() {
                dst.set(
                    addr,
                    F::<D>::mk_swp_entry(nonpresent::SWP_PTE_MARKER, keep.bits()),
                );
            }
            return Ok(None);
        }
    }
    if !dst_vma.uffd_wp() {
        new = F::<D>::swp_clear_uffd_wp(new);
    }
    dst.set(addr, new);
    Ok(None)
}

fn copy_page_for_child<D: PageTable, M: FolioOps + PageAlloc>(
    dst: &mut D,
    mem: &mut M,
    dst_vma: Vma,
    addr: u64,
    pte: u64,
    rss: &mut Rss,
) -> Result<(), Error> {
    type F<D> = <D as PageTable>::Format;
    let new = mem.alloc_page().ok_or(Error::NoMemory)?;
    if let Err(e) = mem.copy_page(new, F::<D>::pfn(pte)) {
        mem.free_page(new);
        return Err(e);
    }
    mem.add_new_anon_rmap(new);
    rss.anon += 1;
    let mut child = F::<D>::mkdirty(F::<D>::with_pfn(dst_vma.page_prot, new));
    if dst_vma.is_writable() {
        child = F::<D>::mkwrite(child);
    }
    if dst_vma.uffd_wp() && F::<D>::is_uffd_wp(pte) {
        child = F::<D>::mk_uffd_wp(child);
    }
    dst.set(addr, child);
    Ok(())
}

/// Zaps `[start, end)` one entry at a time as munmap does (markers dropped), adding the
/// (negative) RSS change to `rss`. Each table's TLB range is flushed before its rmaps are
/// removed and its references dropped.
pub fn zap_range<T, M>(
    table: &mut T,
    mem: &mut M,
    vma: Vma,
    start: u64,
    end: u64,
    rss: &mut Rss,
) -> Result<(), Error>
where
    T: PageTable,
    M: FolioOps,
{
    zap_range_with(table, mem, vma, false, start, end, rss)
}

/// [`zap_range`], keeping markers as `MADV_DONTNEED` does when `keep_markers`
/// ([`Zap::keep_markers`](crate::Zap::keep_markers)).
pub fn zap_range_with<T, M>(
    table: &mut T,
    mem: &mut M,
    vma: Vma,
    keep_markers: bool,
    start: u64,
    end: u64,
    rss: &mut Rss,
) -> Result<(), Error>
where
    T: PageTable,
    M: FolioOps,
{
    type F<T> = <T as PageTable>::Format;
    check_range(start, end)?;
    let leave_markers = keep_markers && vma.uffd_wp() && vma.is_file();
    let mut held = [(
        Folio {
            pfn: 0,
            nr_pages: 0,
            anon: false,
        },
        0u64,
    ); PTRS_PER_TABLE];
    let mut addr = start;
    while addr < end {
        let next = table_end(addr).map_or(end, |e| e.min(end));
        if !table.has_table(addr) {
            if table.is_huge(addr) {
                return Err(Error::HugeMapping { addr });
            }
            addr = next;
            continue;
        }
        let mut n = 0;
        let mut cleared = false;
        let mut a = addr;
        while a < next {
            let pte = table.get(a);
            if F::<T>::is_none(pte) {
                a += PAGE_SIZE;
                continue;
            }
            if !F::<T>::is_present(pte) {
                let kind = NonPresent::decode::<F<T>>(pte);
                let keep = match kind {
                    NonPresent::Marker(m) => {
                        keep_markers && (m.contains(Markers::UFFD_WP) || m.contains(Markers::GUARD))
                    }
                    _ => false,
                };
                if !keep {
                    let pte = table.get_and_clear(a);
                    cleared = true;
                    let folio = kind
                        .pfn()
                        .and_then(|pfn| mem.folio(pfn).filter(|f| f.contains(pfn)));
                    match kind {
                        NonPresent::Swap { .. } => {
                            mem.swap_free(pte);
                            rss.swap -= 1;
                        }
                        NonPresent::Migration { .. } => {
                            if let Some(f) = folio {
                                if f.anon {
                                    rss.anon -= 1;
                                } else {
                                    rss.file -= 1;
                                }
                            }
                        }
                        NonPresent::DevicePrivate { pfn, .. }
                        | NonPresent::DeviceExclusive { pfn } => {
                            if let Some(f) = folio {
                                if f.anon {
                                    rss.anon -= 1;
                                } else {
                                    rss.file -= 1;
                                }
                                held[n] = (f, pfn);
                                n += 1;
                            }
                        }
                        NonPresent::Hwpoison { .. } | NonPresent::Marker(_) => {}
                    }
                    if leave_markers && F::<T>::swp_is_uffd_wp(pte) {
                        table.set(a, F::<T>::mk_swp_entry(nonpresent::SWP_PTE_MARKER, 1));
                    }
                }
                a += PAGE_SIZE;
                continue;
            }
            let pte = table.get_and_clear(a);
            cleared = true;
            let pfn = F::<T>::pfn(pte);
            let folio = if F::<T>::is_special(pte) {
                None
            } else {
                mem.folio(pfn).filter(|f| f.contains(pfn))
            };
            if let Some(folio) = folio {
                if folio.anon {
                    rss.anon -= 1;
                } else {
                    if F::<T>::is_dirty(pte) {
                        mem.mark_dirty(&folio);
                    }
                    if F::<T>::is_young(pte) {
                        mem.mark_accessed(&folio);
                    }
                    rss.file -= 1;
                }
                held[n] = (folio, pfn);
                n += 1;
            }
            if leave_markers && F::<T>::is_uffd_wp(pte) {
                table.set(a, F::<T>::mk_swp_entry(nonpresent::SWP_PTE_MARKER, 1));
            }
            a += PAGE_SIZE;
        }
        if cleared {
            table.flush_tlb_range(addr, next);
        }
        for (folio, pfn) in &held[..n] {
            mem.remove_rmap(folio, *pfn, 1);
            mem.ref_sub(folio, 1);
        }
        addr = next;
    }
    Ok(())
}
