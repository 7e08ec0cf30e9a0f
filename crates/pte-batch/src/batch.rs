//! Batch detection: how many PTEs from here map the following pages of one folio alike
//! (`folio_pte_batch`).

use bitflags::bitflags;

use crate::hal::{Folio, PAGE_SIZE, PageTable, PteFormat};

bitflags! {
    /// Which differences between entries a batch ignores. Accessed and writable are always
    /// ignored (writable is reported as [`Batch::any_writable`]).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct BatchFlags: u8 {
        /// Dirty state may differ (shared mappings at fork, and zap).
        const IGNORE_DIRTY = 1 << 0;
        /// Soft-dirty may differ (when soft-dirty is not tracked, and zap).
        const IGNORE_SOFT_DIRTY = 1 << 1;
    }
}

/// A run of entries that may be handled at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// Entries in the run (at least 1).
    pub nr: usize,
    /// Whether any entry of the run is writable.
    pub any_writable: bool,
}

/// The entry with the bits a batch ignores cleared (`__pte_batch_clear_ignored`).
#[inline]
pub fn batch_key<F: PteFormat>(pte: u64, flags: BatchFlags) -> u64 {
    let mut pte = pte;
    if flags.contains(BatchFlags::IGNORE_DIRTY) {
        pte = F::mkclean(pte);
    }
    if flags.contains(BatchFlags::IGNORE_SOFT_DIRTY) {
        pte = F::clear_soft_dirty(pte);
    }
    F::wrprotect(F::mkold(pte))
}

/// Counts the entries from `addr` (whose value is `pte`, a present entry of a page in `folio`)
/// that map the next frames of `folio` and equal `pte` up to the bits `flags` ignores.
///
/// Stops at `max_nr` (the caller's limit: end of range, table or VMA), at the folio's last
/// frame, or at the first mismatch (uffd-wp, PROT_NONE and non-present entries differ from a
/// present one). Returns at least 1 when `max_nr >= 1`, and 0 only for `max_nr == 0`. The
/// folio metadata is not trusted either: a `pte` outside `folio` gives a batch of 1.
#[inline]
pub fn folio_pte_batch<T: PageTable + ?Sized>(
    table: &T,
    folio: &Folio,
    addr: u64,
    pte: u64,
    max_nr: usize,
    flags: BatchFlags,
) -> Batch {
    let mut any_writable = T::Format::is_writable(pte);
    if max_nr == 0 {
        return Batch {
            nr: 0,
            any_writable,
        };
    }
    let pfn = T::Format::pfn(pte);
    if !folio.contains(pfn) {
        return Batch {
            nr: 1,
            any_writable,
        };
    }
    // Never past the folio's last frame, whatever the table says.
    let limit = (folio.end_pfn() - pfn).min(max_nr as u64) as usize;
    let mut expected = batch_key::<T::Format>(T::Format::advance_pfn(pte, 1), flags);
    let mut nr = 1;
    // Entries are read a chunk at a time (one copy for a table in plain memory), then compared.
    let mut buf = [0u64; 16];
    'outer: while nr < limit {
        let chunk = &mut buf[..(limit - nr).min(16)];
        table.get_many(addr + nr as u64 * PAGE_SIZE, chunk);
        for &next in chunk.iter() {
            if batch_key::<T::Format>(next, flags) != expected {
                break 'outer;
            }
            any_writable |= T::Format::is_writable(next);
            expected = T::Format::advance_pfn(expected, 1);
            nr += 1;
        }
    }
    Batch { nr, any_writable }
}
