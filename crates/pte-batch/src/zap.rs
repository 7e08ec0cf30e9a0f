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
        let mut flush_from = addr;
        let mut cleared = false;
        let mut addr = addr;
        table.lazy_mmu_enter();
        while addr < end {
            let pte = table.get(addr);
            if T::Format::is_none(pte) {
                addr += PAGE_SIZE;
                continue;
            }
            if !T::Format::is_present(pte) {
                let pte = table.get_and_clear(addr);
                self.mem.swap_free(pte);
                self.rss.swap -= 1;
                self.stats.nonpresent += 1;
                cleared = true;
                addr += PAGE_SIZE;
                continue;
            }
            let max_nr = ((end - addr) / PAGE_SIZE) as usize;
            let nr = self.zap_present_ptes(table, addr, pte, max_nr);
            addr += nr as u64 * PAGE_SIZE;
            cleared = true;
            if self.gathered == GATHER {
                table.lazy_mmu_leave();
                self.flush(table, flush_from, addr);
                flush_from = addr;
                cleared = false;
                table.lazy_mmu_enter();
            }
        }
        table.lazy_mmu_leave();
        if cleared {
            self.flush(table, flush_from, addr);
        }
        Ok(())
    }

    /// Clears the present entry `pte` at `addr` and the following entries that batch with it
    /// (at most `max_nr`); returns how many (`zap_present_ptes`).
    fn zap_present_ptes<T: PageTable>(
        &mut self,
        table: &mut T,
        addr: u64,
        pte: u64,
        max_nr: usize,
    ) -> usize {
        let pfn = T::Format::pfn(pte);
        let folio = if T::Format::is_special(pte) {
            None
        } else {
            self.mem.folio(pfn).filter(|f| f.contains(pfn))
        };
        let Some(folio) = folio else {
            table.get_and_clear(addr);
            self.stats.present += 1;
            self.stats.batches += 1;
            return 1;
        };
        let nr = if folio.is_large() && max_nr > 1 {
            let flags = BatchFlags::IGNORE_DIRTY | BatchFlags::IGNORE_SOFT_DIRTY;
            folio_pte_batch(table, &folio, addr, pte, max_nr, flags).nr
        } else {
            1
        };
        let gathered = if nr == 1 {
            table.get_and_clear(addr)
        } else {
            table.get_and_clear_ptes(addr, nr)
        };
        if folio.anon {
            // Anon pages need no up-to-date dirty/accessed state.
            self.rss.anon -= nr as i64;
        } else {
            if T::Format::is_dirty(gathered) {
                self.mem.mark_dirty(&folio);
            }
            if T::Format::is_young(gathered) {
                self.mem.mark_accessed(&folio);
            }
            self.rss.file -= nr as i64;
        }
        self.mem.remove_rmap(&folio, pfn, nr);
        self.gather[self.gathered] = (folio, nr);
        self.gathered += 1;
        self.stats.present += nr as u64;
        self.stats.batches += 1;
        nr
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
