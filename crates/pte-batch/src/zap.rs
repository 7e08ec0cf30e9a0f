//! Teardown (munmap, exit, `MADV_DONTNEED`): clear a range of PTEs a batch of one folio at a
//! time, flush the TLB, then remove the rmaps and drop the references (`zap_pte_range` /
//! `zap_present_ptes` with every rmap removal delayed as `delay_rmap` delays a dirty file
//! folio's).

use crate::batch::{BatchFlags, folio_pte_batch};
use crate::hal::{Folio, FolioOps, PAGE_SIZE, PageTable, PteFormat, table_end};
use crate::nonpresent::{Markers, NonPresent};
use crate::vma::{Rss, Vma};
use crate::{Error, check_range};

/// Folio mappings held back until the TLB is flushed (an `mmu_gather` batch).
const GATHER: usize = 64;

/// Most swap entries freed in one [`FolioOps::swap_free_batch`] call (a swapped-out 64 KiB
/// folio's 16 fit twice; a longer run takes several calls).
pub const SWAP_BATCH: usize = 32;

/// One gathered run: `nr` pages of `folio` from `pfn`, their rmaps and references to drop after
/// the flush.
type Gathered = (Folio, u64, usize);

/// Counters of what a zap did, for tests and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZapStats {
    /// Present entries cleared.
    pub present: u64,
    /// Runs of present entries cleared at once (a single entry counts as one).
    pub batches: u64,
    /// Non-present entries cleared.
    pub nonpresent: u64,
    /// Runs of swap entries freed at once ([`FolioOps::swap_free_batch`] calls).
    pub swap_batches: u64,
    /// TLB range flushes.
    pub tlb_flushes: u64,
}

/// One zap of one VMA: clears entries, accounts RSS, and removes rmaps and drops folio
/// references only after the TLB no longer holds translations to them (so writeback's
/// `mkclean` of a dirty file folio cannot miss a CPU that may still write through a stale
/// entry, and no page is freed under one).
///
/// Non-present entries follow Linux's `zap_nonpresent_ptes`: swap entries release their slots,
/// a run of them at once (`swap_pte_batch`: the same device, consecutive slots, the same flags,
/// as a swapped-out large folio leaves them; [`FolioOps::swap_free_batch`]), migration entries
/// leave the RSS, device-private and device-exclusive entries drop their page's rmap and
/// reference like a present page, and PTE markers are dropped ([`Zap::new`], munmap and exit)
/// or kept ([`Zap::keep_markers`], `MADV_DONTNEED`: uffd-wp and guard markers stay; in a
/// uffd-wp file mapping a zapped uffd-wp entry leaves a uffd-wp marker).
pub struct Zap<'m, M: FolioOps> {
    mem: &'m mut M,
    vma: Vma,
    keep_markers: bool,
    rss: Rss,
    gather: [Gathered; GATHER],
    gathered: usize,
    stats: ZapStats,
}

impl<'m, M: FolioOps> Zap<'m, M> {
    /// Zaps entries of the mapping `vma` as munmap and exit do (`ZAP_FLAG_DROP_MARKER`): every
    /// entry goes, markers included.
    pub fn new(mem: &'m mut M, vma: Vma) -> Self {
        Self {
            mem,
            vma,
            keep_markers: false,
            rss: Rss::default(),
            gather: [(
                Folio {
                    pfn: 0,
                    nr_pages: 0,
                    anon: false,
                },
                0,
                0,
            ); GATHER],
            gathered: 0,
            stats: ZapStats::default(),
        }
    }

    /// Zaps as `MADV_DONTNEED` does: uffd-wp and guard markers stay, and in a uffd-wp file
    /// mapping ([`VmFlags::FILE`](crate::VmFlags::FILE) with
    /// [`VmFlags::UFFD_WP`](crate::VmFlags::UFFD_WP)) an entry with uffd-wp set leaves a uffd-wp
    /// marker.
    pub fn keep_markers(mut self) -> Self {
        self.keep_markers = true;
        self
    }

    /// RSS change so far (negative).
    pub fn rss(&self) -> Rss {
        self.rss
    }

    /// What was done so far.
    pub fn stats(&self) -> ZapStats {
        self.stats
    }

    /// The folio metadata.
    pub fn mem(&mut self) -> &mut M {
        self.mem
    }

    /// The mapping being zapped.
    pub fn vma(&self) -> Vma {
        self.vma
    }

    /// Zaps `[start, end)` table by table, skipping addresses without a table.
    /// [`Error::HugeMapping`] names the first address a huge entry maps (the tables before it
    /// are zapped, flushed and released).
    pub fn zap_range<T: PageTable>(
        &mut self,
        table: &mut T,
        start: u64,
        end: u64,
    ) -> Result<(), Error> {
        check_range(start, end)?;
        let mut addr = start;
        while addr < end {
            let next = table_end(addr).map_or(end, |e| e.min(end));
            if table.has_table(addr) {
                self.zap_pte_range(table, addr, next)?;
            } else if table.is_huge(addr) {
                return Err(Error::HugeMapping { addr });
            }
            addr = next;
        }
        Ok(())
    }

    /// Zaps `[addr, end)`, which must lie in one last-level table. The TLB range is flushed and
    /// the references are dropped before returning.
    pub fn zap_pte_range<T: PageTable>(
        &mut self,
        table: &mut T,
        addr: u64,
        end: u64,
    ) -> Result<(), Error> {
        check_range(addr, end)?;
        if table_end(addr).is_some_and(|t| end > t) {
            return Err(Error::InvalidRange);
        }
        let mut acc = Acc::default();
        let mut flush_from = addr;
        let mut cleared = false;
        let mut addr = addr;
        // In a uffd-wp file mapping zapped with markers kept, uffd-wp entries leave markers:
        // the fast loop hands them to `zap_other`.
        let markers = self.keep_markers && self.vma.uffd_wp() && self.vma.is_file();
        table.lazy_mmu_enter();
        loop {
            let stop = if markers {
                zap_run::<M, T, true>(
                    &mut *self.mem,
                    &mut self.gather,
                    &mut self.gathered,
                    &mut acc,
                    table,
                    &mut addr,
                    end,
                    &mut cleared,
                )
            } else {
                zap_run::<M, T, false>(
                    &mut *self.mem,
                    &mut self.gather,
                    &mut self.gathered,
                    &mut acc,
                    table,
                    &mut addr,
                    end,
                    &mut cleared,
                )
            };
            match stop {
                Stop::Done => break,
                Stop::GatherFull => {}
                Stop::Entry(pte) => {
                    // `zap_run` stops at an entry only with room in the gather.
                    addr += PAGE_SIZE * self.zap_other(table, addr, end, pte, &mut acc) as u64;
                    cleared = true;
                    if self.gathered < GATHER {
                        continue;
                    }
                }
            }
            // The gather is full: flush what was cleared so far, then release it.
            table.lazy_mmu_leave();
            self.flush(table, flush_from, addr);
            flush_from = addr;
            cleared = false;
            table.lazy_mmu_enter();
        }
        table.lazy_mmu_leave();
        if cleared {
            self.flush(table, flush_from, addr);
        }
        self.rss.anon -= acc.anon;
        self.rss.file -= acc.file;
        self.rss.swap -= acc.swap;
        // Every present entry cleared is in RSS unless it has no `struct page`; a batch of
        // `nr` entries is `nr - 1` entries more than batches.
        let present = (acc.anon + acc.file) as u64 + acc.pageless;
        self.stats.present += present;
        self.stats.batches += present - acc.batched_extra;
        self.stats.nonpresent += acc.nonpresent;
        Ok(())
    }

    /// Everything [`zap_run`] declines, from `addr` (before `end`): a non-present entry (by
    /// what it stands for; a run of swap entries at once), a present one without `struct
    /// page`, a uffd-wp entry that leaves a marker. Returns the entries it took (at least 1).
    #[inline(never)]
    fn zap_other<T: PageTable>(
        &mut self,
        table: &mut T,
        addr: u64,
        end: u64,
        pte: u64,
        acc: &mut Acc,
    ) -> usize {
        type F<T> = <T as PageTable>::Format;
        if F::<T>::is_present(pte) {
            let pte = table.get_and_clear(addr);
            let pfn = F::<T>::pfn(pte);
            let folio = if F::<T>::is_special(pte) {
                None
            } else {
                self.mem.folio(pfn).filter(|f| f.contains(pfn))
            };
            match folio {
                Some(folio) => {
                    let counts = (&mut acc.anon, &mut acc.file);
                    unmap_folio::<M, F<T>>(
                        &mut *self.mem,
                        &mut self.gather,
                        &mut self.gathered,
                        counts,
                        folio,
                        pfn,
                        pte,
                        1,
                    );
                }
                // Special, or a frame without (or outside its) folio metadata.
                None => acc.pageless += 1,
            }
            self.leave_marker(table, addr, F::<T>::is_uffd_wp(pte));
            return 1;
        }
        let kind = NonPresent::decode::<F<T>>(pte);
        if let NonPresent::Swap { .. } = kind {
            return self.zap_swap_run(table, addr, end, pte, acc);
        }
        acc.nonpresent += 1;
        if let NonPresent::Marker(m) = kind {
            // `MADV_DONTNEED` keeps uffd-wp and guard markers; munmap drops every marker.
            if self.keep_markers && m.intersects(Markers::UFFD_WP | Markers::GUARD) {
                return 1;
            }
        }
        let pte = table.get_and_clear(addr);
        let folio = kind
            .pfn()
            .and_then(|pfn| self.mem.folio(pfn).filter(|f| f.contains(pfn)));
        match (kind, folio) {
            (NonPresent::Migration { .. }, Some(folio)) => {
                if folio.anon {
                    acc.anon += 1;
                } else {
                    acc.file += 1;
                }
            }
            (
                NonPresent::DevicePrivate { pfn, .. } | NonPresent::DeviceExclusive { pfn },
                Some(folio),
            ) => {
                // The entry holds a mapping and a reference, released like a present page's.
                if folio.anon {
                    acc.anon += 1;
                } else {
                    acc.file += 1;
                }
                self.gather[self.gathered] = (folio, pfn, 1);
                self.gathered += 1;
            }
            _ => {}
        }
        self.leave_marker(table, addr, F::<T>::swp_is_uffd_wp(pte));
        1
    }

    /// The swap entry `pte` at `addr` and the ones after it that continue it slot by slot with
    /// the same flags (`swap_pte_batch`), up to `end` and [`SWAP_BATCH`]: cleared, their slots
    /// freed in one [`FolioOps::swap_free_batch`]. Returns how many.
    fn zap_swap_run<T: PageTable>(
        &mut self,
        table: &mut T,
        addr: u64,
        end: u64,
        pte: u64,
        acc: &mut Acc,
    ) -> usize {
        let max = (((end - addr) / PAGE_SIZE) as usize).clamp(1, SWAP_BATCH);
        let mut run = [0u64; SWAP_BATCH];
        let mut nr = 0;
        while nr < max {
            let at = addr + nr as u64 * PAGE_SIZE;
            if nr > 0 && Some(table.get(at)) != swp_next::<T::Format>(pte, nr as u64) {
                break;
            }
            run[nr] = table.get_and_clear(at);
            nr += 1;
        }
        self.mem.swap_free_batch(&run[..nr]);
        self.stats.swap_batches += 1;
        acc.swap += nr as i64;
        acc.nonpresent += nr as u64;
        // The flags are the run's: one uffd-wp bit for all.
        let uffd_wp = <T::Format as PteFormat>::swp_is_uffd_wp(pte);
        for i in 0..nr as u64 {
            self.leave_marker(table, addr + i * PAGE_SIZE, uffd_wp);
        }
        nr
    }

    /// Leaves a uffd-wp marker at the just cleared `addr` when its entry had uffd-wp
    /// (`pte_install_uffd_wp_if_needed`): only when markers are kept, in a uffd-wp file mapping.
    fn leave_marker<T: PageTable>(&mut self, table: &mut T, addr: u64, uffd_wp: bool) {
        if uffd_wp && self.keep_markers && self.vma.uffd_wp() && self.vma.is_file() {
            table.set(
                addr,
                NonPresent::Marker(Markers::UFFD_WP).encode::<T::Format>(),
            );
        }
    }

    /// Flushes `[start, end)` from the TLB, then removes the gathered rmaps and drops the
    /// references (`tlb_flush_rmaps`, then the page freeing).
    fn flush<T: PageTable>(&mut self, table: &mut T, start: u64, end: u64) {
        table.flush_tlb_range(start, end);
        self.stats.tlb_flushes += 1;
        let mem = &mut *self.mem;
        for &(folio, pfn, nr) in &self.gather[..self.gathered] {
            if nr == 1 {
                // A small folio's page (`folio_put`): the constant lets the backend's
                // one-page path be inlined as such.
                mem.remove_rmap(&folio, pfn, 1);
                mem.ref_sub(&folio, 1);
            } else {
                mem.remove_rmap(&folio, pfn, nr);
                mem.ref_sub(&folio, nr);
            }
        }
        self.gathered = 0;
    }
}

/// What one range zap accumulates (RSS as positive counts).
#[derive(Default)]
struct Acc {
    anon: i64,
    file: i64,
    swap: i64,
    /// Present entries cleared without a `struct page` (not in RSS).
    pageless: u64,
    /// Non-present entries met (cleared or kept).
    nonpresent: u64,
    /// Sum of `nr - 1` over the batches.
    batched_extra: u64,
}

/// The swap entry `n` slots after `pte` with the same device and flags (`pte_next_swp_offset`
/// applied `n` times: the flag bits are whatever `pte` has beyond its type and offset), or
/// `None` past the format's last slot.
fn swp_next<F: PteFormat>(pte: u64, n: u64) -> Option<u64> {
    let (ty, offset) = (F::swp_type(pte), F::swp_offset(pte));
    let flags = pte ^ F::mk_swp_entry(ty, offset);
    let slot = offset.checked_add(n)?;
    let next = F::mk_swp_entry(ty, slot) | flags;
    (F::swp_offset(next) == slot && F::swp_type(next) == ty).then_some(next)
}

/// Where [`zap_run`] stopped.
enum Stop {
    /// At the end of the range.
    Done,
    /// The gather is full: flush before going on.
    GatherFull,
    /// At an entry the loop does not handle (non-present, no `struct page`, uffd-wp when it
    /// leaves a marker), with its value.
    Entry(u64),
}

/// Clears none entries and present entries with a folio from `*addr` on, as Linux's per-PTE
/// code does for a small folio (the only extra work is the "is the folio large?" test), and a
/// large folio's batch with one call, until the range ends, the gather is full or an entry
/// needs [`Zap::zap_other`]. Out of line, with its counters in locals.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn zap_run<M: FolioOps, T: PageTable, const MARKERS: bool>(
    mem: &mut M,
    gather: &mut [Gathered; GATHER],
    gathered: &mut usize,
    acc: &mut Acc,
    table: &mut T,
    addr: &mut u64,
    end: u64,
    cleared: &mut bool,
) -> Stop {
    type F<T> = <T as PageTable>::Format;
    let mut a = *addr;
    let mut n = *gathered;
    let (mut anon, mut file) = (0i64, 0i64);
    let mut any = false;
    let stop = loop {
        if a >= end {
            break Stop::Done;
        }
        let pte = table.get(a);
        if F::<T>::is_none(pte) {
            a += PAGE_SIZE;
            continue;
        }
        if !F::<T>::is_present(pte) || F::<T>::is_special(pte) {
            break Stop::Entry(pte);
        }
        if MARKERS && F::<T>::is_uffd_wp(pte) {
            break Stop::Entry(pte);
        }
        let pfn = F::<T>::pfn(pte);
        let Some(folio) = mem.folio(pfn) else {
            break Stop::Entry(pte);
        };
        if folio.is_large() {
            if !folio.contains(pfn) {
                break Stop::Entry(pte);
            }
            any = true;
            let max_nr = ((end - a) / PAGE_SIZE) as usize;
            *gathered = n;
            let nr = zap_batch(mem, gather, gathered, acc, table, a, pte, folio, max_nr);
            n = *gathered;
            a += nr as u64 * PAGE_SIZE;
        } else {
            // A small folio contains the frame if it starts there (one compare, not two).
            if folio.pfn != pfn || folio.nr_pages == 0 {
                break Stop::Entry(pte);
            }
            any = true;
            // Cleared atomically: the value returned has the MMU's last dirty/accessed bits.
            let pte = table.get_and_clear(a);
            let counts = (&mut anon, &mut file);
            unmap_folio::<M, F<T>>(mem, gather, &mut n, counts, folio, pfn, pte, 1);
            a += PAGE_SIZE;
        }
        if n == GATHER {
            break Stop::GatherFull;
        }
    };
    *addr = a;
    *gathered = n;
    *cleared |= any;
    acc.anon += anon;
    acc.file += file;
    stop
}

/// Clears the present entry `pte` at `addr` (of the large `folio`) and the following entries
/// that batch with it, at most `max_nr`, as one batch (`zap_present_ptes`): one clear, one
/// rmap removal, one gather entry. Returns how many. The gather must have room for one entry.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn zap_batch<M: FolioOps, T: PageTable>(
    mem: &mut M,
    gather: &mut [Gathered; GATHER],
    gathered: &mut usize,
    acc: &mut Acc,
    table: &mut T,
    addr: u64,
    pte: u64,
    folio: Folio,
    max_nr: usize,
) -> usize {
    let pfn = T::Format::pfn(pte);
    let nr = if max_nr > 1 {
        let flags = BatchFlags::IGNORE_DIRTY | BatchFlags::IGNORE_SOFT_DIRTY;
        folio_pte_batch(table, &folio, addr, pte, max_nr, flags).nr
    } else {
        1
    };
    let gathered_pte = if nr == 1 {
        table.get_and_clear(addr)
    } else {
        table.get_and_clear_ptes(addr, nr)
    };
    let counts = (&mut acc.anon, &mut acc.file);
    unmap_folio::<M, T::Format>(mem, gather, gathered, counts, folio, pfn, gathered_pte, nr);
    acc.batched_extra += nr as u64 - 1;
    nr
}

/// Accounts `nr` cleared entries of `folio` from `pfn`, `pte` holding their last dirty and
/// accessed bits: the anon or file count in `counts`, dirty/accessed for a file folio (anon
/// pages need no up-to-date state), and one gather entry, whose rmap removal and reference drop
/// wait for the TLB flush.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn unmap_folio<M: FolioOps, F: PteFormat>(
    mem: &mut M,
    gather: &mut [Gathered; GATHER],
    gathered: &mut usize,
    (anon, file): (&mut i64, &mut i64),
    folio: Folio,
    pfn: u64,
    pte: u64,
    nr: usize,
) {
    if folio.anon {
        *anon += nr as i64;
    } else {
        if F::is_dirty(pte) {
            mem.mark_dirty(&folio);
        }
        if F::is_young(pte) {
            mem.mark_accessed(&folio);
        }
        *file += nr as i64;
    }
    gather[*gathered] = (folio, pfn, nr);
    *gathered += 1;
}
