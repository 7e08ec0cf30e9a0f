//! arm64-style page tables with transparent contiguous-bit management (Linux's "contpte").
//!
//! The core sees entries without the contiguous bit, with accessed/dirty gathered over the
//! block. Underneath, [`ContSpace`] folds a 16-entry block when one `set_ptes` covers all of it
//! with 16 frames aligned to 64 KiB (the caller guarantees they are one folio), and unfolds a
//! folded block (break-before-make: clear, invalidate, rewrite) when a change covers only part
//! of it. Write-protecting or clearing whole blocks keeps them folded.
//!
//! Built with [`ContSpace::with_folios`], it also folds a block that separate writes complete
//! (Linux's `contpte_try_fold`): when `set` or a partial `set_ptes` writes a block's last entry
//! and the 16 entries map consecutive frames from a 64 KiB-aligned one, alike up to
//! accessed/dirty, of one folio (which the backend looks up itself, as arm64 Linux reads
//! `struct page`), the block is rewritten folded (break-before-make), accessed/dirty gathered.

use super::TableStats;
use crate::format::Arm64Pte;
use crate::hal::{Folio, PAGE_SIZE, PageTable, PteFormat};

const CONT: usize = Arm64Pte::CONT_PTES;

/// Last-level arm64 tables over a caller-provided slice: `entries[i]` maps `base + i * 4 KiB`
/// (`base` aligned to 64 KiB).
#[derive(Debug)]
pub struct ContSpace<'a> {
    base: u64,
    entries: &'a mut [u64],
    stats: TableStats,
    /// Raw entries read (counted behind `&self`).
    reads: core::cell::Cell<u64>,
    /// The folio of a frame, for folding blocks completed by separate writes.
    folio_of: Option<FolioOf<'a>>,
}

/// The backend's own view of folio boundaries: the folio holding a frame.
#[derive(Clone, Copy)]
struct FolioOf<'a>(&'a dyn Fn(u64) -> Option<Folio>);

impl core::fmt::Debug for FolioOf<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("FolioOf(..)")
    }
}

impl<'a> ContSpace<'a> {
    /// Tables over `entries` mapping from `base` (rounded down to 64 KiB).
    pub fn new(base: u64, entries: &'a mut [u64]) -> Self {
        Self {
            base: base & !(CONT as u64 * PAGE_SIZE - 1),
            entries,
            stats: TableStats::default(),
            reads: core::cell::Cell::new(0),
            folio_of: None,
        }
    }

    /// [`new`](Self::new), and folding of blocks that separate writes complete
    /// (`contpte_try_fold`): `folio_of(pfn)` is the folio holding frame `pfn` (`None`: no
    /// `struct page`, never folded). Allocates nothing; `folio_of` is called with `&self` only,
    /// once per completed block.
    pub fn with_folios(
        base: u64,
        entries: &'a mut [u64],
        folio_of: &'a dyn Fn(u64) -> Option<Folio>,
    ) -> Self {
        Self {
            folio_of: Some(FolioOf(folio_of)),
            ..Self::new(base, entries)
        }
    }

    /// The raw entries, contiguous bits included.
    pub fn entries(&self) -> &[u64] {
        self.entries
    }

    /// The raw entries, for setting up a table.
    pub fn entries_mut(&mut self) -> &mut [u64] {
        self.entries
    }

    /// What the table was asked to do, including TLB maintenance for break-before-make.
    pub fn stats(&self) -> TableStats {
        TableStats {
            reads: self.reads.get(),
            ..self.stats
        }
    }

    /// Forgets the counters.
    pub fn reset_stats(&mut self) {
        self.stats = TableStats::default();
        self.reads.set(0);
    }

    fn count_reads(&self, n: usize) {
        self.reads.set(self.reads.get() + n as u64);
    }

    /// Whether the block holding `addr` is folded (its entries carry the contiguous bit).
    pub fn is_folded(&self, addr: u64) -> bool {
        self.index(addr)
            .is_some_and(|i| self.entries[i] & Arm64Pte::CONT != 0)
    }

    fn index(&self, addr: u64) -> Option<usize> {
        let i = usize::try_from(addr.checked_sub(self.base)? / PAGE_SIZE).ok()?;
        (i < self.entries.len()).then_some(i)
    }

    fn block(&self, i: usize) -> Option<core::ops::Range<usize>> {
        let s = i & !(CONT - 1);
        (s + CONT <= self.entries.len()).then_some(s..s + CONT)
    }

    fn folded(&self, i: usize) -> bool {
        self.entries[i] & Arm64Pte::CONT != 0
    }

    /// Accessed and dirty of a whole block, as bits to OR into an entry.
    fn gathered(&self, block: core::ops::Range<usize>) -> u64 {
        let mut bits = 0;
        for &e in &self.entries[block] {
            if Arm64Pte::is_young(e) {
                bits |= Arm64Pte::AF;
            }
            if Arm64Pte::is_dirty(e) {
                bits |= Arm64Pte::SW_DIRTY;
            }
        }
        bits
    }

    fn invalidate(&mut self, first: usize, nr: usize) {
        self.stats.tlb_flushes += 1;
        self.stats.tlb_pages += nr as u64;
        let _ = first;
    }

    /// Break-before-make of the folded block holding `i` into 16 ordinary entries, each with
    /// the block's gathered accessed/dirty state.
    fn unfold(&mut self, i: usize) {
        let Some(block) = self.block(i) else {
            // A stray contiguous bit in a partial block: just drop it.
            self.entries[i] &= !Arm64Pte::CONT;
            return;
        };
        let bits = self.gathered(block.clone());
        let mut saved = [0u64; CONT];
        saved.copy_from_slice(&self.entries[block.clone()]);
        self.entries[block.clone()].fill(0);
        self.invalidate(block.start, CONT);
        for (slot, old) in self.entries[block].iter_mut().zip(saved) {
            *slot = if old == 0 {
                0
            } else {
                (old & !Arm64Pte::CONT) | bits
            };
        }
        self.stats.writes += 2 * CONT as u64;
        self.stats.unfolds += 1;
    }

    /// Writes a whole block of 16 frames with the contiguous bit, breaking any valid mapping
    /// there first.
    fn fold_write(&mut self, s: usize, pte: u64) {
        if self.entries[s..s + CONT]
            .iter()
            .any(|&e| Arm64Pte::is_present(e))
        {
            self.entries[s..s + CONT].fill(0);
            self.invalidate(s, CONT);
            self.stats.writes += CONT as u64;
        }
        let mut p = pte | Arm64Pte::CONT;
        for slot in &mut self.entries[s..s + CONT] {
            *slot = p;
            p = Arm64Pte::advance_pfn(p, 1);
        }
        self.stats.writes += CONT as u64;
        self.stats.folds += 1;
    }

    fn set_one(&mut self, i: usize, pte: u64) {
        if self.folded(i) {
            self.unfold(i);
        }
        self.entries[i] = pte & !Arm64Pte::CONT;
        self.stats.writes += 1;
        if i % CONT == CONT - 1 {
            self.try_fold(i);
        }
    }

    /// `contpte_try_fold` after entry `i`, a block's last, was written: folds the block when
    /// its 16 entries map consecutive frames from a 64 KiB-aligned one, alike up to
    /// accessed/dirty, inside one folio.
    fn try_fold(&mut self, i: usize) {
        let (Some(folio_of), Some(b)) = (self.folio_of, self.block(i)) else {
            return;
        };
        let first = self.entries[b.start];
        if !foldable(first) || !Arm64Pte::is_present(first) {
            return;
        }
        let plain = |x: u64| Arm64Pte::mkold(Arm64Pte::mkclean(x));
        self.count_reads(CONT);
        let alike = self.entries[b.clone()]
            .iter()
            .enumerate()
            .all(|(k, &x)| plain(x) == plain(Arm64Pte::advance_pfn(first, k as u64)));
        let pfn = Arm64Pte::pfn(first);
        let in_folio =
            folio_of.0(pfn).is_some_and(|f| f.contains(pfn) && f.contains(pfn + CONT as u64 - 1));
        if alike && in_folio {
            let bits = self.gathered(b.clone());
            self.fold_write(b.start, plain(first) | bits);
        }
    }
}

/// Whether `pte` may head a folded block: a valid entry whose frame is 64 KiB aligned.
fn foldable(pte: u64) -> bool {
    pte & Arm64Pte::VALID != 0 && Arm64Pte::pfn(pte) % CONT as u64 == 0
}

impl PageTable for ContSpace<'_> {
    type Format = Arm64Pte;

    fn get(&self, addr: u64) -> u64 {
        self.get_run(addr).0
    }

    /// One read of a folded block: its accessed/dirty gathered, and, when its 16 entries are
    /// what a fold writes (consecutive frames, one protection up to accessed/dirty, all with
    /// the contiguous bit: stray bits in a corrupt table are not trusted), the rest of the
    /// block as the run (`pte_batch_hint`).
    fn get_run(&self, addr: u64) -> (u64, usize) {
        let Some(i) = self.index(addr) else {
            return (0, 1);
        };
        let e = self.entries[i];
        if e & Arm64Pte::CONT == 0 {
            self.count_reads(1);
            return (e, 1);
        }
        let Some(b) = self.block(i) else {
            self.count_reads(1);
            return (e & !Arm64Pte::CONT, 1);
        };
        self.count_reads(CONT);
        let base = self.entries[b.start];
        let plain = |x: u64| Arm64Pte::mkold(Arm64Pte::mkclean(x));
        let mut bits = 0;
        let mut uniform = true;
        for (k, &x) in self.entries[b.clone()].iter().enumerate() {
            if Arm64Pte::is_young(x) {
                bits |= Arm64Pte::AF;
            }
            if Arm64Pte::is_dirty(x) {
                bits |= Arm64Pte::SW_DIRTY;
            }
            uniform &=
                x & Arm64Pte::CONT != 0 && plain(x) == plain(Arm64Pte::advance_pfn(base, k as u64));
        }
        let run = if uniform { CONT - i % CONT } else { 1 };
        ((e & !Arm64Pte::CONT) | bits, run)
    }

    fn set(&mut self, addr: u64, pte: u64) {
        if let Some(i) = self.index(addr) {
            self.set_one(i, pte);
        }
    }

    fn set_ptes(&mut self, addr: u64, pte: u64, nr: usize) {
        let Some(mut i) = self.index(addr) else {
            return;
        };
        let end = i.saturating_add(nr).min(self.entries.len());
        let mut pte = pte & !Arm64Pte::CONT;
        while i < end {
            if i % CONT == 0 && end - i >= CONT && foldable(pte) {
                self.fold_write(i, pte);
                i += CONT;
                pte = Arm64Pte::advance_pfn(pte, CONT as u64);
            } else {
                self.set_one(i, pte);
                i += 1;
                pte = Arm64Pte::advance_pfn(pte, 1);
            }
        }
    }

    fn wrprotect_ptes(&mut self, addr: u64, nr: usize) {
        let Some(mut i) = self.index(addr) else {
            return;
        };
        let end = i.saturating_add(nr).min(self.entries.len());
        while i < end {
            let n = if self.folded(i) {
                if i % CONT == 0 && end - i >= CONT {
                    // The whole block changes: keep it folded.
                    CONT
                } else {
                    // Only part of a folded block changes: unfold it first.
                    self.unfold(i);
                    1
                }
            } else {
                1
            };
            for k in i..i + n {
                let e = self.entries[k];
                if Arm64Pte::is_writable(e) {
                    self.entries[k] = Arm64Pte::wrprotect(e);
                    self.stats.writes += 1;
                    self.stats.wrprotects += 1;
                }
            }
            i += n;
        }
    }

    fn get_and_clear(&mut self, addr: u64) -> u64 {
        let Some(i) = self.index(addr) else { return 0 };
        if self.folded(i) {
            self.unfold(i);
        }
        let e = self.entries[i];
        self.entries[i] = 0;
        self.stats.writes += 1;
        e
    }

    fn get_and_clear_ptes(&mut self, addr: u64, nr: usize) -> u64 {
        let Some(start) = self.index(addr) else {
            return 0;
        };
        let end = start.saturating_add(nr).min(self.entries.len());
        let first = self.entries[start] & !Arm64Pte::CONT;
        let mut bits = 0;
        let mut i = start;
        while i < end {
            let whole = i % CONT == 0 && end - i >= CONT;
            if self.folded(i) && !whole {
                self.unfold(i);
            }
            let n = if whole && self.folded(i) { CONT } else { 1 };
            for slot in &mut self.entries[i..i + n] {
                let e = *slot;
                if Arm64Pte::is_young(e) {
                    bits |= Arm64Pte::AF;
                }
                if Arm64Pte::is_dirty(e) {
                    bits |= Arm64Pte::SW_DIRTY;
                }
                *slot = 0;
            }
            self.stats.writes += n as u64;
            i += n;
        }
        first | bits
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
