//! The arm64-style contiguous-bit backend: folding, unfolding, and what fork and zap cost on it.
#![allow(clippy::needless_range_loop)]

use oskit_pte_batch::hal::PAGE_SIZE;
use oskit_pte_batch::sim::{ContSpace, SimFolios, SimPage};
use oskit_pte_batch::{Arm64Pte, Fork, PageTable, PteFormat, VmFlags, Vma, Zap};

const BASE: u64 = 0x40_0000;
const PFN: u64 = 0x1000;
/// Writable and clean (read-only until the MMU's dirty-bit management clears RDONLY).
const RW: u64 = Arm64Pte::VALID
    | Arm64Pte::RDONLY
    | Arm64Pte::PAGE
    | Arm64Pte::USER
    | Arm64Pte::SHARED
    | Arm64Pte::AF
    | Arm64Pte::NG
    | Arm64Pte::DBM
    | Arm64Pte::UXN
    | Arm64Pte::PXN;

fn a(i: usize) -> u64 {
    BASE + i as u64 * PAGE_SIZE
}

fn cow() -> Vma {
    Vma::new(VmFlags::MAYWRITE | VmFlags::WRITE, Arm64Pte::USER_READONLY)
}

/// Forks entries `0..n` of a parent whose entry `i` maps `pfns[i]` (folios given by `layout`:
/// (first pfn, order)), returning the child's table stats and raw entries.
fn fork_child(layout: &[(u64, u8)], pfns: &[u64]) -> (oskit_pte_batch::sim::TableStats, Vec<u64>) {
    let mut pages = vec![SimPage::default(); 256];
    let mut folios = SimFolios::new(PFN, &mut pages);
    for &(pfn, order) in layout {
        folios.add_folio(pfn, order, true).unwrap();
    }
    let (mut pm, mut cm) = (vec![0u64; 512], vec![0u64; 512]);
    let mut parent = ContSpace::new(BASE, &mut pm);
    let mut child = ContSpace::new(BASE, &mut cm);
    for (i, &pfn) in pfns.iter().enumerate() {
        parent.set(a(i), Arm64Pte::with_pfn(RW, pfn));
        folios.account_mapping(pfn);
    }
    let mut fork = Fork::new(&mut folios, cow(), cow());
    fork.copy_range(&mut child, &mut parent, a(0), a(pfns.len()))
        .unwrap();
    drop(fork);
    assert_eq!(folios.violations(), 0);
    (child.stats(), child.entries().to_vec())
}

#[test]
fn fold_only_when_one_folio_covers_the_block() {
    // One 64 KiB folio, aligned in VA and PA: folded.
    let pfns: Vec<u64> = (0..16).map(|k| PFN + k).collect();
    let (s, e) = fork_child(&[(PFN, 4)], &pfns);
    assert_eq!((s.folds, s.unfolds, s.tlb_flushes), (1, 0, 0));
    assert!(e[..16].iter().all(|&x| x & Arm64Pte::CONT != 0));
    // Two 32 KiB folios with consecutive frames: two batches, no fold.
    let (s, e) = fork_child(&[(PFN, 3), (PFN + 8, 3)], &pfns);
    assert_eq!(s.folds, 0);
    assert!(e[..16].iter().all(|&x| x & Arm64Pte::CONT == 0 && x != 0));
    // A 64 KiB folio mapped 8 pages off its alignment: no fold.
    let pfns8: Vec<u64> = (0..16).map(|k| PFN + 8 + k).collect();
    let (s, _) = fork_child(&[(PFN, 5)], &pfns8);
    assert_eq!(s.folds, 0);
    // A 128 KiB folio: two folds.
    let pfns32: Vec<u64> = (0..32).map(|k| PFN + k).collect();
    let (s, _) = fork_child(&[(PFN, 5)], &pfns32);
    assert_eq!(s.folds, 2);
}

/// A parent of four folded blocks (one 256 KiB folio), writable.
fn folded_parent(mem: &mut [u64]) -> ContSpace<'_> {
    let mut t = ContSpace::new(BASE, mem);
    t.set_ptes(a(0), Arm64Pte::with_pfn(RW, PFN), 64);
    assert_eq!(t.stats().folds, 4);
    t.reset_stats();
    t
}

#[test]
fn wrprotect_over_a_partial_block_unfolds_only_the_edges() {
    let mut mem = vec![0u64; 512];
    let mut t = folded_parent(&mut mem);
    t.wrprotect_ptes(a(8), 48); // 8..56: half of block 0, blocks 1 and 2, half of block 3
    let s = t.stats();
    assert_eq!(s.unfolds, 2);
    assert_eq!(s.tlb_flushes, 2, "one invalidation per break-before-make");
    assert!(!t.is_folded(a(0)) && t.is_folded(a(16)) && t.is_folded(a(32)) && !t.is_folded(a(48)));
    for i in 0..64 {
        assert_eq!(
            Arm64Pte::is_writable(t.get(a(i))),
            !(8..56).contains(&i),
            "entry {i}"
        );
        assert_eq!(Arm64Pte::pfn(t.get(a(i))), PFN + i as u64);
    }
}

#[test]
fn fork_of_folded_parent_keeps_it_folded() {
    let mut pages = vec![SimPage::default(); 256];
    let mut folios = SimFolios::new(PFN, &mut pages);
    folios.add_folio(PFN, 6, true).unwrap();
    for k in 0..64 {
        folios.account_mapping(PFN + k);
    }
    let (mut pm, mut cm) = (vec![0u64; 512], vec![0u64; 512]);
    let mut parent = folded_parent(&mut pm);
    let mut child = ContSpace::new(BASE, &mut cm);
    let mut fork = Fork::new(&mut folios, cow(), cow());
    fork.copy_range(&mut child, &mut parent, a(0), a(64))
        .unwrap();
    assert_eq!(fork.stats().batches, 1);
    drop(fork);
    let (ps, cs) = (parent.stats(), child.stats());
    assert_eq!(ps.unfolds, 0, "whole blocks are write-protected in place");
    assert_eq!(ps.tlb_flushes, 1, "one flush of the write-protected range");
    assert_eq!((cs.folds, cs.unfolds, cs.tlb_flushes), (4, 0, 0));
    assert!((0..64).all(
        |i| !Arm64Pte::is_writable(parent.get(a(i))) && !Arm64Pte::is_writable(child.get(a(i)))
    ));
}

#[test]
fn per_pte_updates_of_a_folded_block_unfold_it() {
    let mut mem = vec![0u64; 512];
    let mut t = folded_parent(&mut mem);
    let e = t.get(a(3));
    t.set(a(3), Arm64Pte::wrprotect(e));
    assert_eq!(t.stats().unfolds, 1);
    assert!(!t.is_folded(a(0)) && t.is_folded(a(16)));
}

#[test]
fn folded_block_gathers_access_and_dirty() {
    let mut mem = vec![0u64; 512];
    let mut t = folded_parent(&mut mem);
    // The MMU dirties one page of block 1 and clears AF on another (hardware updates one entry).
    t.entries_mut()[17] |= Arm64Pte::SW_DIRTY;
    for i in 16..32 {
        t.entries_mut()[i] &= !Arm64Pte::AF;
    }
    t.entries_mut()[20] |= Arm64Pte::AF;
    assert!(Arm64Pte::is_dirty(t.get(a(30))) && Arm64Pte::is_young(t.get(a(30))));
    assert!(!Arm64Pte::is_dirty(t.get(a(0))));
    // Unfolding spreads the gathered state to every entry.
    t.set(a(16), 0);
    assert!(Arm64Pte::is_dirty(t.get(a(25))) && Arm64Pte::is_young(t.get(a(25))));
}

#[test]
fn zap_of_whole_blocks_needs_no_unfold() {
    let mut pages = vec![SimPage::default(); 256];
    let mut folios = SimFolios::new(PFN, &mut pages);
    folios.add_folio(PFN, 6, false).unwrap();
    for k in 0..64 {
        folios.account_mapping(PFN + k);
    }
    let mut mem = vec![0u64; 512];
    let mut t = folded_parent(&mut mem);
    t.entries_mut()[40] |= Arm64Pte::SW_DIRTY;
    let vma = Vma::new(VmFlags::SHARED, Arm64Pte::USER_READONLY);
    let mut zap = Zap::new(&mut folios, vma);
    zap.zap_range(&mut t, a(8), a(64)).unwrap();
    assert_eq!(zap.rss().file, -56);
    assert_eq!(t.stats().unfolds, 1, "only the partially zapped block 0");
    assert!(t.entries()[8..64].iter().all(|&e| e == 0));
    assert!(
        t.entries()[..8]
            .iter()
            .all(|&e| e != 0 && e & Arm64Pte::CONT == 0)
    );
    let head = folios.page(PFN).unwrap();
    assert!(head.dirty);
    assert_eq!((head.refcount, head.total_mapcount), (8, 8));
}

#[test]
fn arm64_format_semantics() {
    let clean_rw = Arm64Pte::with_pfn(RW, 5);
    assert!(Arm64Pte::is_writable(clean_rw) && !Arm64Pte::is_dirty(clean_rw));
    let hw_dirty = clean_rw & !Arm64Pte::RDONLY;
    assert!(Arm64Pte::is_dirty(hw_dirty));
    // Write-protect keeps the hardware dirty state as software dirty.
    let ro = Arm64Pte::wrprotect(hw_dirty);
    assert!(!Arm64Pte::is_writable(ro) && Arm64Pte::is_dirty(ro) && ro & Arm64Pte::RDONLY != 0);
    assert!(!Arm64Pte::is_dirty(Arm64Pte::mkclean(ro)));
    let pn = (clean_rw & !Arm64Pte::VALID) | Arm64Pte::PROT_NONE;
    assert!(Arm64Pte::is_present(pn) && Arm64Pte::is_protnone(pn));
    assert_eq!(Arm64Pte::pfn(Arm64Pte::advance_pfn(clean_rw, 3)), 8);
}

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// Random arm64 parents (folded and unfolded runs, mixed dirty/young/writable): the batched
/// copy on the contiguous backend sees the same logical entries and metadata as the per-PTE
/// reference, and zapping both leaves nothing behind.
#[test]
fn contiguous_backend_batched_equals_reference() {
    for seed in 1..if cfg!(miri) { 4 } else { 200u64 } {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut pages = vec![SimPage::default(); 1024];
        let mut folios = SimFolios::new(PFN, &mut pages);
        let mut pfn = PFN;
        while pfn < PFN + 1024 {
            let mut order = [0u8, 2, 4, 4, 5, 6][rng.below(6) as usize];
            while pfn % (1 << order) != 0 {
                order -= 1;
            }
            folios.add_folio(pfn, order, rng.below(2) == 0).unwrap();
            pfn += 1 << order;
        }
        let mut pm = vec![0u64; 512];
        let mut parent = ContSpace::new(BASE, &mut pm);
        let mut i = 0usize;
        while i < 512 {
            let len = (1 + rng.below(48) as usize).min(512 - i);
            let first = PFN + rng.below(1024 - len as u64);
            let mut flags = RW;
            if rng.below(2) == 0 {
                flags &= !Arm64Pte::RDONLY; // hardware dirty
            }
            if rng.below(3) == 0 {
                flags = Arm64Pte::wrprotect(flags);
            }
            if rng.below(4) == 0 {
                i += len;
                continue;
            }
            // Aligned runs go in with set_ptes (and may fold), the rest one by one.
            if i % 16 == 0 && first % 16 == 0 && rng.below(2) == 0 {
                parent.set_ptes(a(i), Arm64Pte::with_pfn(flags, first), len);
            } else {
                for k in 0..len {
                    parent.set(a(i + k), Arm64Pte::with_pfn(flags, first + k as u64));
                }
            }
            for k in 0..len {
                folios.account_mapping(first + k as u64);
            }
            i += len;
        }
        let (mut pm2, mut pages2) = (pm.clone(), pages.clone());
        let (mut cm, mut cm2) = (vec![0u64; 512], vec![0u64; 512]);
        let vma = if seed % 3 == 0 {
            Vma::new(
                VmFlags::SHARED | VmFlags::MAYWRITE | VmFlags::WRITE,
                Arm64Pte::USER_READONLY,
            )
        } else {
            cow()
        };
        let mut f1 = SimFolios::from_pages(PFN, &mut pages);
        let mut f2 = SimFolios::from_pages(PFN, &mut pages2);
        let (mut p1, mut c1) = (ContSpace::new(BASE, &mut pm), ContSpace::new(BASE, &mut cm));
        let (mut p2, mut c2) = (
            ContSpace::new(BASE, &mut pm2),
            ContSpace::new(BASE, &mut cm2),
        );
        let mut fork = Fork::new(&mut f1, vma, vma);
        fork.copy_range(&mut c1, &mut p1, a(0), a(512)).unwrap();
        let rss1 = fork.rss();
        drop(fork);
        let mut rss2 = oskit_pte_batch::Rss::default();
        oskit_pte_batch::reference::copy_range(
            &mut c2,
            &mut p2,
            &mut f2,
            vma,
            vma,
            a(0),
            a(512),
            &mut rss2,
        )
        .unwrap();
        assert_eq!(rss1, rss2, "seed {seed}");
        let ignore = if vma.is_shared() {
            Arm64Pte::DBM | Arm64Pte::RDONLY
        } else {
            0
        };
        for i in 0..512 {
            assert_eq!(p1.get(a(i)), p2.get(a(i)), "seed {seed}: parent {i}");
            assert_eq!(
                c1.get(a(i)) & !ignore,
                c2.get(a(i)) & !ignore,
                "seed {seed}: child {i}"
            );
        }
        assert_eq!(f1.pages(), f2.pages(), "seed {seed}: metadata");
        assert!(
            p1.stats().unfolds <= p2.stats().unfolds,
            "seed {seed}: batching never unfolds more"
        );
        for t in [&mut c1, &mut p1] {
            let mut zap = Zap::new(&mut f1, vma);
            zap.zap_range(t, a(0), a(512)).unwrap();
        }
        assert_eq!(f1.violations(), 0, "seed {seed}");
        assert!(
            f1.pages()
                .iter()
                .all(|p| p.refcount == 0 && p.mapcount == 0 && p.total_mapcount == 0),
            "seed {seed}: references or mappings left after zapping both"
        );
    }
}

/// The batch scan reads a folded block once (`pte_batch_hint`): 16 raw reads per 16 entries,
/// not 16 per entry; a block whose contiguous bits are stray (not what a fold writes) is read
/// entry by entry and not trusted.
#[test]
fn batch_scan_reads_a_folded_block_once() {
    use oskit_pte_batch::{BatchFlags, Folio, folio_pte_batch};
    let mut mem = vec![0u64; 512];
    let mut t = ContSpace::new(BASE, &mut mem);
    t.set_ptes(a(0), Arm64Pte::with_pfn(RW, PFN), 512);
    assert_eq!(t.stats().folds, 32);
    t.reset_stats();
    let folio = Folio {
        pfn: PFN,
        nr_pages: 512,
        anon: true,
    };
    let first = t.get(a(0));
    let b = folio_pte_batch(&t, &folio, a(0), first, 512, BatchFlags::empty());
    assert_eq!(b.nr, 512);
    // The test's get of the first entry (one block) and the scan: every entry read once.
    assert_eq!(t.stats().reads, 16 + 512);
    // Starting mid-block: the rest of that block in one read too.
    t.reset_stats();
    let e = t.get(a(5));
    let b = folio_pte_batch(&t, &folio, a(5), e, 27, BatchFlags::empty());
    assert_eq!(b.nr, 27);
    assert_eq!(t.stats().reads, 16 + 32);

    // A stray contiguous bit over entries that are not one fold: no run is trusted, and the
    // scan stops at the entry that differs.
    let mut mem = vec![0u64; 512];
    let mut t = ContSpace::new(BASE, &mut mem);
    for k in 0..16 {
        t.entries_mut()[k] = Arm64Pte::with_pfn(RW, PFN + k as u64) | Arm64Pte::CONT;
    }
    t.entries_mut()[9] = Arm64Pte::with_pfn(RW, PFN + 100) | Arm64Pte::CONT;
    let folio = Folio {
        pfn: PFN,
        nr_pages: 16,
        anon: true,
    };
    let e = t.get(a(0));
    assert_eq!(
        folio_pte_batch(&t, &folio, a(0), e, 16, BatchFlags::empty()).nr,
        9
    );
}

/// Folio boundaries as a backend sees them: a 64 KiB folio at `PFN`, order-0 folios after it.
fn folio_of(pfn: u64) -> Option<oskit_pte_batch::Folio> {
    let (start, nr) = if (PFN..PFN + 16).contains(&pfn) {
        (PFN, 16)
    } else {
        (pfn, 1)
    };
    Some(oskit_pte_batch::Folio {
        pfn: start,
        nr_pages: nr,
        anon: true,
    })
}

#[test]
fn per_pte_writes_completing_a_block_of_one_folio_fold_it() {
    let mut mem = vec![0u64; 64];
    let mut t = ContSpace::with_folios(BASE, &mut mem, &folio_of);
    // Entries 0..15 one by one, accessed/dirty differing: nothing folds before the last.
    for k in 0..16u64 {
        let pte = Arm64Pte::with_pfn(RW, PFN + k);
        let pte = if k == 3 {
            Arm64Pte::clear_soft_dirty(Arm64Pte::mkdirty(pte))
        } else {
            Arm64Pte::mkold(pte)
        };
        t.set(a(k as usize), pte);
        assert_eq!(t.stats().folds, u64::from(k == 15), "after entry {k}");
    }
    assert!(t.is_folded(a(0)) && t.is_folded(a(15)));
    let s = t.stats();
    // Break-before-make of the 16 valid entries, 16 rewritten; the block read once to decide.
    assert_eq!(
        (s.folds, s.unfolds, s.tlb_flushes, s.tlb_pages),
        (1, 0, 1, 16)
    );
    assert_eq!(s.writes, 16 + 16 + 16);
    assert_eq!(s.reads, 16);
    for k in 0..16 {
        let e = t.get(a(k));
        assert_eq!(Arm64Pte::pfn(e), PFN + k as u64);
        assert!(
            Arm64Pte::is_dirty(e) && Arm64Pte::is_young(e),
            "gathered into entry {k}"
        );
    }
    // The batch scan now reads the block once.
    t.reset_stats();
    assert_eq!(t.get_run(a(0)).1, 16);
    assert_eq!(t.stats().reads, 16);
}

#[test]
fn per_pte_writes_fold_nothing_else() {
    // 16 aligned consecutive frames of 16 order-0 folios; one frame off; one entry read-only;
    // a partial block; and the same folio without the folio lookup.
    let cases: [(&str, u64, Option<usize>, usize); 4] = [
        ("order-0 folios", PFN + 16, None, 16),
        ("read-only entry", PFN, Some(7), 16),
        ("partial block", PFN, None, 15),
        ("frame off", PFN, Some(16), 16),
    ];
    for (what, first, odd, n) in cases {
        let mut mem = vec![0u64; 64];
        let mut t = ContSpace::with_folios(BASE, &mut mem, &folio_of);
        for k in 0..n {
            let mut pte = Arm64Pte::with_pfn(RW, first + k as u64);
            if odd == Some(k) {
                pte = Arm64Pte::wrprotect(pte);
            }
            if odd == Some(16) && k == 9 {
                pte = Arm64Pte::with_pfn(RW, first + 20);
            }
            t.set(a(k), pte);
        }
        assert_eq!(t.stats().folds, 0, "{what}");
        assert!(!t.is_folded(a(0)), "{what}");
    }
    let mut mem = vec![0u64; 64];
    let mut t = ContSpace::new(BASE, &mut mem);
    for k in 0..16 {
        t.set(a(k), Arm64Pte::with_pfn(RW, PFN + k as u64));
    }
    assert_eq!(
        t.stats().folds,
        0,
        "no folio lookup: never folded by separate writes"
    );
}

#[test]
fn per_pte_fork_into_a_folding_child_folds_each_block() {
    // The per-PTE reference writes the child's 32 entries one by one: with the folio lookup,
    // the first block (one 64 KiB folio) folds after its 16th entry; the second (order-0
    // folios) does not.
    let mut pages = vec![SimPage::default(); 256];
    let mut folios = SimFolios::new(PFN, &mut pages);
    folios.add_folio(PFN, 4, true).unwrap();
    for k in 16..32 {
        folios.add_folio(PFN + k, 0, true).unwrap();
    }
    let (mut pm, mut cm) = (vec![0u64; 512], vec![0u64; 512]);
    let mut parent = ContSpace::new(BASE, &mut pm);
    let mut child = ContSpace::with_folios(BASE, &mut cm, &folio_of);
    for k in 0..32 {
        parent.set(a(k), Arm64Pte::with_pfn(RW, PFN + k as u64));
        folios.account_mapping(PFN + k as u64);
    }
    let mut rss = oskit_pte_batch::Rss::default();
    oskit_pte_batch::reference::copy_range(
        &mut child,
        &mut parent,
        &mut folios,
        cow(),
        cow(),
        a(0),
        a(32),
        &mut rss,
    )
    .unwrap();
    assert_eq!(rss.anon, 32);
    assert_eq!(child.stats().folds, 1);
    assert!(child.is_folded(a(0)) && !child.is_folded(a(16)));
    assert_eq!(folios.violations(), 0);
}
