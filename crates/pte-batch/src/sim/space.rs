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

    fn index(&self, addr: u64) -> Option<usize> {
        let i = usize::try_from(addr.checked_sub(self.base)? / PAGE_SIZE).ok()?;
        (i < self.entries.len()).then_some(i)
    }
}

impl<F: PteFormat> PageTable for SimSpace<'_, F> {
    type Format = F;

    #[inline]
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

    #[inline]
    fn set(&mut self, addr: u64, pte: u64) {
        if let Some(i) = self.index(addr) {
            self.entries[i] = pte;
            self.stats.writes += 1;
        }
    }

    #[inline]
    fn set_ptes(&mut self, addr: u64, pte: u64, nr: usize) {
        let Some(i) = self.index(addr) else { return };
        let end = i.saturating_add(nr).min(self.entries.len());
        let mut pte = pte;
        for slot in &mut self.entries[i..end] {
            *slot = pte;
            pte = F::advance_pfn(pte, 1);
        }
        self.stats.writes += (end - i) as u64;
    }

    #[inline]
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
        for slot in &mut self.entries[i..end] {
            if F::is_writable(*slot) {
                *slot = F::wrprotect(*slot);
                self.stats.writes += 1;
                self.stats.wrprotects += 1;
            }
        }
    }

    #[inline]
    fn get_and_clear(&mut self, addr: u64) -> u64 {
        match self.index(addr) {
            Some(i) => {
                self.stats.writes += 1;
                core::mem::take(&mut self.entries[i])
            }
            None => 0,
        }
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
