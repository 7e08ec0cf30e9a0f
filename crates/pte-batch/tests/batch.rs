//! `folio_pte_batch` against its definition, one entry at a time: entry `i` of the batch must
//! equal the first entry advanced by `i` frames, up to the ignored bits. Covers the in-place
//! scan over plain memory (`raw_entries`), the chunked reads of a backend without it, and
//! frames at the top of the PFN field (where adding a constant would overflow it).

mod common;

use common::Rng;
use oskit_pte_batch::batch::batch_key;
use oskit_pte_batch::hal::PAGE_SIZE;
use oskit_pte_batch::sim::SimSpace;
use oskit_pte_batch::{
    Arm64Pte, Batch, BatchFlags, Folio, PageTable, PteFormat, X86Pte, folio_pte_batch,
};

const BASE: u64 = 0x40_0000;
const N: usize = 512;

/// The definition, written out naively.
fn naive<F: PteFormat>(
    entries: &[u64],
    folio: &Folio,
    start: usize,
    max_nr: usize,
    flags: BatchFlags,
) -> Batch {
    let pte = entries[start];
    let mut any_writable = F::is_writable(pte);
    if max_nr == 0 {
        return Batch {
            nr: 0,
            any_writable,
        };
    }
    let pfn = F::pfn(pte);
    if !folio.contains(pfn) {
        return Batch {
            nr: 1,
            any_writable,
        };
    }
    let limit = (folio.end_pfn() - pfn).min(max_nr as u64) as usize;
    let mut nr = 1;
    while nr < limit {
        let next = entries.get(start + nr).copied().unwrap_or(0);
        if batch_key::<F>(next, flags) != batch_key::<F>(F::advance_pfn(pte, nr as u64), flags) {
            break;
        }
        any_writable |= F::is_writable(next);
        nr += 1;
    }
    Batch { nr, any_writable }
}

/// A table that only implements `get`/`set`: the scan reads it through `get_many`.
struct ViaGet<'a, F: PteFormat>(SimSpace<'a, F>);

impl<F: PteFormat> PageTable for ViaGet<'_, F> {
    type Format = F;
    fn get(&self, addr: u64) -> u64 {
        self.0.get(addr)
    }
    fn set(&mut self, addr: u64, pte: u64) {
        self.0.set(addr, pte)
    }
    fn flush_tlb_range(&mut self, _: u64, _: u64) {}
}

/// Runs of entries mapping consecutive frames from `first_pfn` with random flag changes
/// (each bit the key looks at or ignores), gaps and PFN jumps.
fn random_table<F: PteFormat>(
    rng: &mut Rng,
    first_pfn: u64,
    base_flags: u64,
    bits: &[u64],
) -> Vec<u64> {
    let mut entries = vec![0u64; N];
    let mut pfn = first_pfn;
    for e in entries.iter_mut() {
        let mut flags = base_flags;
        for &b in bits {
            if rng.chance(8) {
                flags ^= b;
            }
        }
        *e = if rng.chance(2) {
            0
        } else {
            F::with_pfn(flags, pfn)
        };
        pfn = if rng.chance(3) {
            pfn.wrapping_add(rng.below(5))
        } else {
            pfn.wrapping_add(1)
        };
    }
    entries
}

fn check<F: PteFormat>(seed: u64, base_flags: u64, bits: &[u64], pfn_top: u64) {
    let mut rng = Rng::new(seed);
    for round in 0..if cfg!(miri) { 4 } else { 60 } {
        // Frames anywhere, or just below the top of the PFN field.
        let first_pfn = if round % 3 == 0 {
            pfn_top - rng.below(2 * N as u64)
        } else {
            0x1000 + rng.below(1 << 20)
        };
        let mut entries = random_table::<F>(&mut rng, first_pfn, base_flags, bits);
        let mut copy = entries.clone();
        let start = rng.below(N as u64) as usize;
        let pfn = F::pfn(entries[start]);
        // Folio metadata is not trusted: any start and size, often containing the frame.
        let folio = Folio {
            pfn: pfn.wrapping_sub(rng.below(600)),
            nr_pages: 1 + rng.below(1100),
            anon: true,
        };
        let max_nr = rng.below((N - start) as u64 + 1) as usize;
        let flags = BatchFlags::from_bits_truncate(rng.below(4) as u8);
        let want = naive::<F>(&entries, &folio, start, max_nr, flags);
        let addr = BASE + start as u64 * PAGE_SIZE;
        let raw = SimSpace::<F>::new(BASE, &mut entries);
        let got = folio_pte_batch(&raw, &folio, addr, raw.get(addr), max_nr, flags);
        assert_eq!(got, want, "seed {seed} round {round}: in-place scan");
        let via_get = ViaGet(SimSpace::<F>::new(BASE, &mut copy));
        let got = folio_pte_batch(&via_get, &folio, addr, via_get.get(addr), max_nr, flags);
        assert_eq!(
            got, want,
            "seed {seed} round {round}: scan through get_many"
        );
    }
}

#[test]
fn x86_scan_matches_its_definition() {
    let base = X86Pte::USER_READONLY | X86Pte::with_pfn(0, 0);
    let bits = [
        1 << 1,
        1 << 5,
        1 << 6,
        1 << 8,
        1 << 9,
        1 << 10,
        1 << 11,
        1 << 63,
        1,
    ];
    for seed in 0..if cfg!(miri) { 2 } else { 40 } {
        check::<X86Pte>(seed, base | 0x2 | 0x60, &bits, X86Pte::PFN_MASK >> 12);
    }
}

#[test]
fn arm64_scan_matches_its_definition() {
    let base = Arm64Pte::USER_READONLY | Arm64Pte::DBM;
    let bits = [
        Arm64Pte::DBM,
        Arm64Pte::RDONLY,
        Arm64Pte::AF,
        Arm64Pte::SW_DIRTY,
        Arm64Pte::SOFT_DIRTY,
        Arm64Pte::UFFD_WP,
        Arm64Pte::PROT_NONE,
        Arm64Pte::VALID,
        Arm64Pte::CONT,
    ];
    for seed in 0..if cfg!(miri) { 2 } else { 40 } {
        check::<Arm64Pte>(seed, base, &bits, Arm64Pte::PFN_MASK >> 12);
    }
}
