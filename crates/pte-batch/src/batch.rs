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
#[inline(always)]
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
    let any_writable = T::Format::is_writable(pte);
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
    if limit == 1 {
        return Batch {
            nr: 1,
            any_writable,
        };
    }
    // One comparison function per combination of ignored bits, so the loop has no branches on
    // `flags`: for x86 the key is one AND with a constant.
    let dirty = flags.contains(BatchFlags::IGNORE_DIRTY);
    let soft = flags.contains(BatchFlags::IGNORE_SOFT_DIRTY);
    match (dirty, soft) {
        (false, false) => scan::<T, false, false>(table, addr, pte, limit),
        (true, false) => scan::<T, true, false>(table, addr, pte, limit),
        (false, true) => scan::<T, false, true>(table, addr, pte, limit),
        (true, true) => scan::<T, true, true>(table, addr, pte, limit),
    }
}

/// [`batch_key`] with the flags known at compile time.
#[inline(always)]
fn key<F: PteFormat, const DIRTY: bool, const SOFT: bool>(pte: u64) -> u64 {
    let mut flags = BatchFlags::empty();
    flags.set(BatchFlags::IGNORE_DIRTY, DIRTY);
    flags.set(BatchFlags::IGNORE_SOFT_DIRTY, SOFT);
    batch_key::<F>(pte, flags)
}

/// The scan of [`folio_pte_batch`] once `limit` (>= 2) entries are known to stay in the
/// folio: entry `i` must equal, ignoring the bits the key clears, `pte` advanced by `i`
/// frames, which is the previous expected value plus a constant (the PFN is a plain field).
#[inline(always)]
fn scan<T: PageTable + ?Sized, const DIRTY: bool, const SOFT: bool>(
    table: &T,
    addr: u64,
    pte: u64,
    limit: usize,
) -> Batch {
    type F<T> = <T as PageTable>::Format;
    let mut any_writable = F::<T>::is_writable(pte);
    let step = F::<T>::advance_pfn(pte, 1).wrapping_sub(pte);
    let first = key::<F<T>, DIRTY, SOFT>(F::<T>::advance_pfn(pte, 1));
    let rest = limit - 1;
    // Adding `step` is exact while the PFN field does not overflow, which its value at the
    // last entry tells; otherwise (garbage frames at the top of the field) step generically.
    let last = key::<F<T>, DIRTY, SOFT>(F::<T>::advance_pfn(pte, rest as u64));
    if last != first.wrapping_add(step.wrapping_mul(rest as u64 - 1)) {
        let mut nr = 1;
        while nr < limit {
            let next = table.get(addr + nr as u64 * PAGE_SIZE);
            let want = key::<F<T>, DIRTY, SOFT>(F::<T>::advance_pfn(pte, nr as u64));
            if key::<F<T>, DIRTY, SOFT>(next) != want {
                break;
            }
            any_writable |= F::<T>::is_writable(next);
            nr += 1;
        }
        return Batch { nr, any_writable };
    }
    let mut expected = first;
    let mut nr = 1;
    if let Some(run) = table.raw_entries(addr + PAGE_SIZE, rest) {
        // Plain memory: compare the words in place.
        for &next in run {
            if key::<F<T>, DIRTY, SOFT>(next) != expected {
                break;
            }
            any_writable |= F::<T>::is_writable(next);
            expected = expected.wrapping_add(step);
            nr += 1;
        }
        return Batch { nr, any_writable };
    }
    if let Some(run) = table.atomic_entries(addr + PAGE_SIZE, rest) {
        // Memory the MMU updates: compare in place, one relaxed load each.
        for slot in run {
            let next = slot.load(core::sync::atomic::Ordering::Relaxed);
            if key::<F<T>, DIRTY, SOFT>(next) != expected {
                break;
            }
            any_writable |= F::<T>::is_writable(next);
            expected = expected.wrapping_add(step);
            nr += 1;
        }
        return Batch { nr, any_writable };
    }
    // Otherwise through the backend's reads: an entry and the run it heads (a folded block is
    // one read), then the entries up to the next 64 KiB boundary in one chunk.
    let mut buf = [0u64; 16];
    'outer: while nr < limit {
        let at = addr + nr as u64 * PAGE_SIZE;
        let (next, run) = table.get_run(at);
        if key::<F<T>, DIRTY, SOFT>(next) != expected {
            break;
        }
        any_writable |= F::<T>::is_writable(next);
        let n = run.clamp(1, limit - nr);
        expected = expected.wrapping_add(step.wrapping_mul(n as u64));
        nr += n;
        if run > 1 || nr >= limit {
            continue;
        }
        let to_boundary = 15 - ((at / PAGE_SIZE) % 16) as usize;
        let chunk = &mut buf[..(limit - nr).min(to_boundary)];
        if chunk.is_empty() {
            continue;
        }
        table.get_many(addr + nr as u64 * PAGE_SIZE, chunk);
        for &next in chunk.iter() {
            if key::<F<T>, DIRTY, SOFT>(next) != expected {
                break 'outer;
            }
            any_writable |= F::<T>::is_writable(next);
            expected = expected.wrapping_add(step);
            nr += 1;
        }
    }
    Batch { nr, any_writable }
}
