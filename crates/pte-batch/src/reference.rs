//! The per-PTE reference: copy and zap one entry at a time, with Linux's semantics from before
//! batching (`copy_present_pte` of 6.8). The property tests and the fuzz target compare the
//! batched code against it, and the benchmarks measure against it.
//!
//! It shares no code with [`Fork`](crate::Fork) and [`Zap`](crate::Zap) beyond the traits.

use crate::hal::{
    Folio, FolioOps, PAGE_SIZE, PTRS_PER_TABLE, PageAlloc, PageTable, PteFormat, table_end,
};
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
        mem.swap_dup(pte)?;
        rss.swap += 1;
        if !dst_vma.uffd_wp() {
            pte = F::<D>::swp_clear_uffd_wp(pte);
        }
        dst.set(addr, pte);
        return Ok(());
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
        src.set(addr, F::<D>::wrprotect(src.get(addr)));
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

/// Zaps `[start, end)` one entry at a time, adding the (negative) RSS change to `rss`. Each
/// table's TLB range is flushed before its references are dropped.
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
    type F<T> = <T as PageTable>::Format;
    let _ = vma;
    check_range(start, end)?;
    let mut held = [Folio {
        pfn: 0,
        nr_pages: 0,
        anon: false,
    }; PTRS_PER_TABLE];
    let mut addr = start;
    while addr < end {
        let next = table_end(addr).map_or(end, |e| e.min(end));
        if !table.has_table(addr) {
            addr = next;
            continue;
        }
        let mut n = 0;
        let mut cleared = false;
        let mut a = addr;
        while a < next {
            let pte = table.get(a);
            if !F::<T>::is_none(pte) {
                let pte = table.get_and_clear(a);
                cleared = true;
                if !F::<T>::is_present(pte) {
                    mem.swap_free(pte);
                    rss.swap -= 1;
                } else {
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
                        mem.remove_rmap(&folio, pfn, 1);
                        held[n] = folio;
                        n += 1;
                    }
                }
            }
            a += PAGE_SIZE;
        }
        if cleared {
            table.flush_tlb_range(addr, next);
        }
        for folio in &held[..n] {
            mem.ref_sub(folio, 1);
        }
        addr = next;
    }
    Ok(())
}
