//! Teardown (munmap, exit): clear a range of PTEs a batch of one folio at a time, drop rmaps,
//! flush the TLB once, then drop the references (`zap_pte_range` / `zap_present_ptes`).

use crate::batch::{BatchFlags, folio_pte_batch};
use crate::hal::{Folio, FolioOps, PAGE_SIZE, PageTable, PteFormat, table_end};
use crate::vma::{Rss, Vma};
use crate::{Error, check_range};

/// Folio references held back until the TLB is flushed (an `mmu_gather` batch).
const GATHER: usize = 64;

/// Counters of what a zap did, for tests and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZapStats {
    /// Present entries cleared.
    pub present: u64,
    /// Runs of present entries cleared at once (a single entry counts as one).
    pub batches: u64,
    /// Non-present entries cleared.
    pub nonpresent: u64,
    /// TLB range flushes.
    pub tlb_flushes: u64,
}

/// One zap of one VMA: clears entries, accounts RSS, and drops folio references only after
/// the TLB no longer holds translations to them.
pub struct Zap<'m, M: FolioOps> {
    mem: &'m mut M,
    vma: Vma,
    rss: Rss,
    gather: [(Folio, usize); GATHER],
    gathered: usize,
    stats: ZapStats,
}

impl<'m, M: FolioOps> Zap<'m, M> {
    /// Zaps entries of the mapping `vma`.
    pub fn new(mem: &'m mut M, vma: Vma) -> Self {
        Self {
            mem,
            vma,
            rss: Rss::default(),
            gather: [(
                Folio {
                    pfn: 0,
                    nr_pages: 0,
                    anon: false,
                },
                0,
            ); GATHER],
            gathered: 0,
            stats: ZapStats::default(),
        }
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
        table.lazy_mmu_enter();
        loop {
            let stop = zap_run(
                &mut *self.mem,
                &mut self.gather,
                &mut self.gathered,
                &mut acc,
                table,
                &mut addr,
                end,
                &mut cleared,
            );
            match stop {
                Stop::Done => break,
                Stop::GatherFull => {}
                Stop::Entry(pte) => {
                    // `zap_run` stops at an entry only with room in the gather, and
                    // `zap_other` gathers nothing: go on.
                    self.zap_other(table, addr, pte, &mut acc);
                    addr += PAGE_SIZE;
                    cleared = true;
                    continue;
                }
            }
            // The gather is full: flush what was cleared so far, then drop its references.
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
        self.stats.nonpresent += acc.swap as u64;
        Ok(())
    }

    /// Everything [`zap_run`] declines, one entry: a non-present (swap) entry, a present one
    /// without `struct page`.
    #[inline(never)]
    fn zap_other<T: PageTable>(&mut self, table: &mut T, addr: u64, pte: u64, acc: &mut Acc) {
        if !T::Format::is_present(pte) {
            let pte = table.get_and_clear(addr);
            self.mem.swap_free(pte);
            acc.swap += 1;
            return;
        }
        // Special, or a frame without (or outside its) folio metadata: nothing to account.
        table.get_and_clear(addr);
        acc.pageless += 1;
    }

    /// Flushes `[start, end)` from the TLB, then drops the gathered references.
    fn flush<T: PageTable>(&mut self, table: &mut T, start: u64, end: u64) {
        table.flush_tlb_range(start, end);
        self.stats.tlb_flushes += 1;
        for i in 0..self.gathered {
            let (folio, nr) = self.gather[i];
            self.mem.ref_sub(&folio, nr);
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
    /// Sum of `nr - 1` over the batches.
    batched_extra: u64,
}

/// Where [`zap_run`] stopped.
enum Stop {
    /// At the end of the range.
    Done,
    /// The gather is full: flush before going on.
    GatherFull,
    /// At an entry the loop does not handle (non-present, no `struct page`), with its value.
    Entry(u64),
}

/// Clears none entries and present entries with a folio from `*addr` on, as Linux's per-PTE
/// code does for a small folio (the only extra work is the "is the folio large?" test), and a
/// large folio's batch with one call, until the range ends, the gather is full or an entry
/// needs [`Zap::zap_other`]. Out of line, with its counters in locals.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn zap_run<M: FolioOps, T: PageTable>(
    mem: &mut M,
    gather: &mut [(Folio, usize); GATHER],
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
    gather: &mut [(Folio, usize); GATHER],
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
/// pages need no up-to-date state), the rmap removal, and one gather entry.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn unmap_folio<M: FolioOps, F: PteFormat>(
    mem: &mut M,
    gather: &mut [(Folio, usize); GATHER],
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
    mem.remove_rmap(&folio, pfn, nr);
    gather[*gathered] = (folio, nr);
    *gathered += 1;
}
