//! A plain page-table model: consecutive last-level tables in a caller-provided slice.

use core::marker::PhantomData;

use super::TableStats;
use crate::format::X86Pte;
use crate::hal::{PAGE_SIZE, PageTable, PteFormat};

/// Last-level tables mapping `[base, base + entries.len() * 4 KiB)`: `entries[i]` maps
/// `base + i * 4 KiB`. Every 512 entries form one table. Addresses outside read as none and
/// ignore writes.
#[derive(Debug)]
pub struct SimSpace<'a, F: PteFormat = X86Pte> {
    base: u64,
    entries: &'a mut [u64],
    stats: TableStats,
    _format: PhantomData<F>,
}

impl<'a, F: PteFormat> SimSpace<'a, F> {
    /// Tables over `entries` mapping from `base` (page aligned; rounded down otherwise).
    pub fn new(base: u64, entries: &'a mut [u64]) -> Self {
        Self {
            base: base & !(PAGE_SIZE - 1),
            entries,
            stats: TableStats::default(),
            _format: PhantomData,
        }
    }

    /// First mapped address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The raw entries.
    pub fn entries(&self) -> &[u64] {
        self.entries
    }

    /// The raw entries, for setting up a table.
    pub fn entries_mut(&mut self) -> &mut [u64] {
        self.entries
    }

    /// What the table was asked to do.
    pub fn stats(&self) -> TableStats {
        self.stats
    }

    /// Forgets the counters.
    pub fn reset_stats(&mut self) {
        self.stats = TableStats::default();
    }

    #[inline(always)]
    fn index(&self, addr: u64) -> Option<usize> {
        let i = usize::try_from(addr.checked_sub(self.base)? / PAGE_SIZE).ok()?;
        (i < self.entries.len()).then_some(i)
    }
}

impl<F: PteFormat> PageTable for SimSpace<'_, F> {
    type Format = F;

    #[inline(always)]
    fn get(&self, addr: u64) -> u64 {
        self.index(addr).map_or(0, |i| self.entries[i])
    }

    #[inline]
    fn get_many(&self, addr: u64, out: &mut [u64]) {
        let Some(i) = self.index(addr) else {
            out.fill(0);
            return;
        };
        let n = out.len().min(self.entries.len() - i);
        out[..n].copy_from_slice(&self.entries[i..i + n]);
        out[n..].fill(0);
    }

    #[inline(always)]
    fn set(&mut self, addr: u64, pte: u64) {
        if let Some(i) = self.index(addr) {
            self.entries[i] = pte;
            self.stats.writes += 1;
        }
    }

    #[inline]
    fn raw_entries(&self, addr: u64, nr: usize) -> Option<&[u64]> {
        let i = self.index(addr)?;
        self.entries.get(i..i.checked_add(nr)?)
    }

    #[inline]
    fn set_ptes(&mut self, addr: u64, pte: u64, nr: usize) {
        let Some(i) = self.index(addr) else { return };
        let end = i.saturating_add(nr).min(self.entries.len());
        let slots = &mut self.entries[i..end];
        self.stats.writes += slots.len() as u64;
        let Some(last) = slots.len().checked_sub(1) else {
            return;
        };
        // Entry k is `pte` plus k steps while the PFN field does not overflow (see
        // `PteFormat::advance_pfn`), which the last entry's value tells.
        let step = F::advance_pfn(pte, 1).wrapping_sub(pte);
        if F::advance_pfn(pte, last as u64) == pte.wrapping_add(step.wrapping_mul(last as u64)) {
            let mut pte = pte;
            for slot in slots {
                *slot = pte;
                pte = pte.wrapping_add(step);
            }
        } else {
            for (k, slot) in slots.iter_mut().enumerate() {
                *slot = F::advance_pfn(pte, k as u64);
            }
        }
    }

    #[inline(always)]
    fn wrprotect_ptes(&mut self, addr: u64, nr: usize) {
        let Some(i) = self.index(addr) else { return };
        if nr == 1 {
            let e = self.entries[i];
            if F::is_writable(e) {
                self.entries[i] = F::wrprotect(e);
                self.stats.writes += 1;
                self.stats.wrprotects += 1;
            }
            return;
        }
        let end = i.saturating_add(nr).min(self.entries.len());
        // Rewriting an entry that was already read-only with its own value changes nothing:
        // no branch per entry, and the counters once.
        let mut changed = 0;
        for slot in &mut self.entries[i..end] {
            let e = *slot;
            let w = F::is_writable(e);
            *slot = if w { F::wrprotect(e) } else { e };
            changed += u64::from(w);
        }
        self.stats.writes += changed;
        self.stats.wrprotects += changed;
    }

    #[inline(always)]
    fn get_and_clear(&mut self, addr: u64) -> u64 {
        match self.index(addr) {
            Some(i) => {
                self.stats.writes += 1;
                core::mem::take(&mut self.entries[i])
            }
            None => 0,
        }
    }

    #[inline]
    fn get_and_clear_ptes(&mut self, addr: u64, nr: usize) -> u64 {
        let Some(i) = self.index(addr) else { return 0 };
        let end = i.saturating_add(nr).min(self.entries.len());
        let slots = &mut self.entries[i..end];
        let Some((head, rest)) = slots.split_first_mut() else {
            return 0;
        };
        let mut first = core::mem::take(head);
        let (mut dirty, mut young) = (false, false);
        for slot in rest {
            let e = core::mem::take(slot);
            dirty |= F::is_dirty(e);
            young |= F::is_young(e);
        }
        if dirty {
            first = F::mkdirty(first);
        }
        if young {
            first = F::mkyoung(first);
        }
        self.stats.writes += (end - i) as u64;
        first
    }

    fn flush_tlb_range(&mut self, start: u64, end: u64) {
        self.stats.tlb_flushes += 1;
        self.stats.tlb_pages += end.saturating_sub(start) / PAGE_SIZE;
    }

    fn lazy_mmu_enter(&mut self) {
        self.stats.lazy_sections += 1;
    }

    fn has_table(&self, addr: u64) -> bool {
        self.index(addr).is_some()
    }
}
