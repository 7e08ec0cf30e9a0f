//! One test per edge case of batch detection, copy and zap.
#![allow(clippy::needless_range_loop)]

mod common;

use common::*;
use oskit_pte_batch::hal::{PAGE_SIZE, PTRS_PER_TABLE};
use oskit_pte_batch::sim::{SimFolios, SimSpace};
use oskit_pte_batch::{
    BatchFlags, Error, Fork, PageTable, Progress, PteFormat, VmFlags, Vma, X86Pte, folio_pte_batch,
};

const FOLIO: u64 = BASE_PFN; // first folio of every scenario

fn cow() -> Vma {
    Vma::new(VmFlags::MAYWRITE | VmFlags::WRITE, X86Pte::USER_READONLY)
}
fn shared() -> Vma {
    Vma::new(
        VmFlags::SHARED | VmFlags::MAYWRITE | VmFlags::WRITE,
        X86Pte::USER_READONLY,
    )
}

/// A world with one folio of `order` at FOLIO mapped by entries `0..flags.len()` from page
/// `offset` of the folio, entry `i` with `flags[i]` (0 leaves a hole).
fn world(vma: Vma, order: u8, anon: bool, offset: u64, flags: &[u64]) -> World {
    let mut w = World::new(2, 2048, vma, vma);
    w.folios().add_folio(FOLIO, order, anon).unwrap();
    for (i, &f) in flags.iter().enumerate() {
        if f != 0 {
            w.map(i, pte(FOLIO + offset + i as u64, f));
        }
    }
    w
}

fn batches_of(w: &mut World, end: usize) -> u64 {
    let (r, _, v, stats) = w.fork(0, end);
    assert_eq!(r, Ok(()));
    assert_eq!(v, 0);
    stats.batches
}

const RO: u64 = P | US | A;
const RWF: u64 = P | US | A | RW;

#[test]
fn mixed_writable_cow_is_one_batch_and_all_read_only() {
    let mut w = world(
        cow(),
        4,
        true,
        0,
        &[
            RO, RWF, RO, RWF, RWF, RO, RO, RO, RWF, RO, RO, RO, RO, RO, RO, RO,
        ],
    );
    assert_eq!(batches_of(&mut w, 16), 1);
    for i in 0..16 {
        assert!(!X86Pte::is_writable(w.parent[i]), "parent {i} writable");
        assert!(!X86Pte::is_writable(w.child[i]), "child {i} writable");
    }
    assert_eq!(w.page(FOLIO).refcount, 32);
}

#[test]
fn mixed_writable_shared_is_one_batch_and_child_writable() {
    let mut w = world(shared(), 4, false, 0, &[RO, RWF, RO, RO, RO, RO, RO, RO]);
    let parent_before = w.parent.clone();
    assert_eq!(batches_of(&mut w, 8), 1);
    assert_eq!(w.parent, parent_before, "shared parent entries unchanged");
    assert!((0..8).all(|i| X86Pte::is_writable(w.child[i])));
    // All read-only: the child stays read-only.
    let mut w = world(shared(), 4, false, 0, &[RO; 8]);
    assert_eq!(batches_of(&mut w, 8), 1);
    assert!((0..8).all(|i| !X86Pte::is_writable(w.child[i])));
}

#[test]
fn dirty_splits_private_but_not_shared() {
    let flags = [RO | D, RO | D, RO, RO, RO | D, RO | D, RO | D, RO | D];
    let mut w = world(cow(), 3, false, 0, &flags);
    assert_eq!(batches_of(&mut w, 8), 3);
    for i in 0..8 {
        assert_eq!(
            X86Pte::is_dirty(w.child[i]),
            X86Pte::is_dirty(flags[i]),
            "private child keeps dirty"
        );
    }
    let mut w = world(shared(), 3, false, 0, &flags);
    assert_eq!(batches_of(&mut w, 8), 1);
    assert!(
        (0..8).all(|i| !X86Pte::is_dirty(w.child[i])),
        "shared child clean"
    );
    assert!((0..8).all(|i| X86Pte::is_dirty(w.parent[i]) == X86Pte::is_dirty(flags[i])));
}

#[test]
fn soft_dirty_splits_only_when_tracked() {
    let flags = [RO | SD, RO, RO, RO | SD];
    let tracked = Vma::new(
        VmFlags::MAYWRITE | VmFlags::SOFT_DIRTY_TRACKED,
        X86Pte::USER_READONLY,
    );
    let mut w = world(tracked, 2, true, 0, &flags);
    assert_eq!(batches_of(&mut w, 4), 3);
    assert!((0..4).all(|i| X86Pte::is_soft_dirty(w.child[i]) == X86Pte::is_soft_dirty(flags[i])));
    let mut w = world(cow(), 2, true, 0, &flags);
    assert_eq!(batches_of(&mut w, 4), 1);
}

#[test]
fn uffd_wp_change_ends_a_batch() {
    let uffd = Vma::new(
        VmFlags::MAYWRITE | VmFlags::WRITE | VmFlags::UFFD_WP,
        X86Pte::USER_READONLY,
    );
    let flags = [RO, RO, RO | UFFD, RO | UFFD, RO];
    let mut w = world(uffd, 3, true, 0, &flags);
    assert_eq!(batches_of(&mut w, 5), 3);
    assert!(
        X86Pte::is_uffd_wp(w.child[2]) && !X86Pte::is_uffd_wp(w.child[1]),
        "child keeps uffd-wp"
    );
    // A child without uffd-wp drops the bit.
    let mut w = world(uffd, 3, true, 0, &flags);
    w.dst = cow();
    w.fork(0, 5).0.unwrap();
    assert!((0..5).all(|i| !X86Pte::is_uffd_wp(w.child[i])));
}

#[test]
fn protnone_neighbours_end_batches() {
    let none = (RO & !P) | G;
    let flags = [RO, RO, none, none, RO, RO];
    let mut w = world(cow(), 3, true, 0, &flags);
    assert_eq!(
        batches_of(&mut w, 6),
        3,
        "two present runs and one PROT_NONE run"
    );
    assert!(X86Pte::is_protnone(w.child[2]) && X86Pte::is_protnone(w.child[3]));
    assert!(!X86Pte::is_protnone(w.child[4]));
}

#[test]
fn non_present_entry_in_the_middle_splits() {
    let mut w = world(cow(), 3, true, 0, &[RO, RO, RO, 0, RO, RO, RO, RO]);
    w.parent[3] = swap_entry(77, false);
    let (r, rss, v, stats) = w.fork(0, 8);
    assert_eq!((r, v), (Ok(()), 0));
    assert_eq!(stats.batches, 2);
    assert_eq!((rss.anon, rss.swap), (7, 1));
    assert_eq!(w.child[3], w.parent[3]);
}

#[test]
fn pinned_anon_folio_copies_single_pages_and_leaks_nothing() {
    let mut w = world(cow(), 2, true, 0, &[RWF; 4]);
    {
        let mut f = w.folios();
        let head = f.page_mut(FOLIO).unwrap();
        head.pinned = true;
        head.refcount += PIN_BIAS;
        // Pages 1 and 2 are exclusive (pinned); 0 and 3 were already shared.
        f.page_mut(FOLIO + 1).unwrap().anon_exclusive = true;
        f.page_mut(FOLIO + 2).unwrap().anon_exclusive = true;
        f.page_mut(FOLIO + 1).unwrap().data = 0x1111;
        f.page_mut(FOLIO + 2).unwrap().data = 0x2222;
    }
    let used_before = w.pages.iter().filter(|p| p.used).count();
    let (r, rss, v, stats) = w.fork(0, 4);
    assert_eq!((r, v), (Ok(()), 0));
    assert_eq!(rss.anon, 4);
    assert_eq!(stats.page_copies, 2);
    // Shared pages 0 and 3 map the folio; 1 and 2 map private, writable copies.
    for i in [0, 3] {
        assert_eq!(X86Pte::pfn(w.child[i]), FOLIO + i as u64);
        assert!(!X86Pte::is_writable(w.child[i]));
    }
    for i in [1, 2] {
        let c = X86Pte::pfn(w.child[i]);
        assert_ne!(c, FOLIO + i as u64);
        assert!(X86Pte::is_writable(w.child[i]) && X86Pte::is_dirty(w.child[i]));
        assert_eq!(w.page(c).data, w.page(FOLIO + i as u64).data);
        assert!(w.page(c).anon_exclusive && w.page(c).mapcount == 1 && w.page(c).refcount == 1);
        // The parent keeps its pinned page exclusive.
        assert!(w.page(FOLIO + i as u64).anon_exclusive);
    }
    // Two more pages in use: the copies. Unused preallocations were freed.
    assert_eq!(w.pages.iter().filter(|p| p.used).count(), used_before + 2);
    assert_eq!(w.page(FOLIO).refcount, PIN_BIAS + 4 + 2);
}

#[test]
fn pinned_page_without_memory_fails_cleanly() {
    let mut w = world(cow(), 2, true, 0, &[RWF; 4]);
    {
        let mut f = w.folios();
        let head = f.page_mut(FOLIO).unwrap();
        head.pinned = true;
        head.anon_exclusive = true;
    }
    let before = w.pages.clone();
    let (res, rss, v) = {
        let (src, dst) = (w.src, w.dst);
        let mut folios = SimFolios::from_pages(BASE_PFN, &mut w.pages);
        folios.set_alloc_budget(Some(0));
        let mut p = SimSpace::<X86Pte>::new(BASE, &mut w.parent);
        let mut c = SimSpace::<X86Pte>::new(BASE, &mut w.child);
        let mut fork = Fork::new(&mut folios, src, dst);
        let r = fork.copy_range(&mut c, &mut p, addr(0), addr(4));
        let rss = fork.rss();
        drop(fork);
        (r, rss, folios.violations())
    };
    assert_eq!(res, Err(Error::NoMemory));
    assert_eq!(res.unwrap_err().errno(), 12);
    assert_eq!((rss.anon, v), (0, 0));
    assert_eq!(w.pages, before, "no reference, mapcount or page leaked");
    assert!(w.child.iter().all(|&e| e == 0));
}

#[test]
fn poisoned_pinned_page_fails_with_hardware_poison_and_frees_the_copy() {
    let mut w = world(cow(), 0, true, 0, &[RWF]);
    {
        let mut f = w.folios();
        let head = f.page_mut(FOLIO).unwrap();
        head.pinned = true;
        head.anon_exclusive = true;
        head.poisoned = true;
    }
    let before = w.pages.clone();
    let (r, rss, v, _) = w.fork(0, 1);
    assert_eq!(r, Err(Error::HardwarePoison));
    assert_eq!(r.unwrap_err().errno(), 133);
    assert_eq!((rss.anon, v), (0, 0));
    assert_eq!(
        w.pages.iter().filter(|p| p.used).count(),
        before.iter().filter(|p| p.used).count()
    );
    assert_eq!(w.page(FOLIO), &before[0]);
}

#[test]
fn folio_across_two_tables_is_one_batch_per_table() {
    // A 2 MiB folio mapped from entry 256: its first half ends table 0, its second half starts
    // table 1.
    let mut w = World::new(2, 2048, cow(), cow());
    w.folios().add_folio(FOLIO, 9, true).unwrap();
    for k in 0..512 {
        w.map(256 + k, pte(FOLIO + k as u64, RWF));
    }
    let (r, rss, v, stats) = w.fork(0, 2 * PTRS_PER_TABLE);
    assert_eq!((r, v), (Ok(()), 0));
    assert_eq!(stats.batches, 2);
    assert_eq!(rss.anon, 512);
    assert_eq!(w.page(FOLIO).refcount, 1024);
    assert!((0..512).all(|k| X86Pte::pfn(w.child[256 + k]) == FOLIO + k as u64));
}

#[test]
fn batch_stops_at_range_end_and_table_end() {
    let mut w = world(cow(), 4, true, 0, &[RO; 16]);
    let f = SimFolios::from_pages(BASE_PFN, &mut w.pages);
    let folio = oskit_pte_batch::FolioOps::folio(&f, FOLIO).unwrap();
    let t = SimSpace::<X86Pte>::new(BASE, &mut w.parent);
    let b = folio_pte_batch(&t, &folio, addr(0), t.get(addr(0)), 5, BatchFlags::empty());
    assert_eq!(b.nr, 5, "max_nr bounds the batch");
    let b = folio_pte_batch(
        &t,
        &folio,
        addr(0),
        t.get(addr(0)),
        100,
        BatchFlags::empty(),
    );
    assert_eq!(b.nr, 16, "the folio end bounds the batch");
    // Range end inside the folio.
    let mut w = world(cow(), 4, true, 0, &[RO; 16]);
    let (r, rss, _, stats) = w.fork(0, 10);
    assert_eq!((r, rss.anon, stats.batches), (Ok(()), 10, 1));
    assert!(w.child[10..16].iter().all(|&e| e == 0));
    // Table end: a folio mapped over entries 508..516 splits at 512.
    let mut w = World::new(2, 2048, cow(), cow());
    w.folios().add_folio(FOLIO, 3, true).unwrap();
    for k in 0..8 {
        w.map(508 + k, pte(FOLIO + k as u64, RO));
    }
    assert_eq!(batches_of(&mut w, 1024), 2);
}

#[test]
fn consecutive_frames_of_two_folios_split() {
    let mut w = World::new(1, 2048, cow(), cow());
    w.folios().add_folio(FOLIO, 3, true).unwrap();
    w.folios().add_folio(FOLIO + 8, 3, false).unwrap();
    for k in 0..16 {
        w.map(k, pte(FOLIO + k as u64, RO));
    }
    let (r, rss, _, stats) = w.fork(0, 16);
    assert_eq!(r, Ok(()));
    assert_eq!(stats.batches, 2);
    assert_eq!((rss.anon, rss.file), (8, 8));
    assert_eq!(
        (w.page(FOLIO).refcount, w.page(FOLIO + 8).refcount),
        (16, 16)
    );
}

#[test]
fn folio_mapped_from_its_middle() {
    // Pages 5..16 of a 64 KiB folio mapped at entries 0..11, then its pages 0..5 at 11..16.
    let mut w = World::new(1, 2048, cow(), cow());
    w.folios().add_folio(FOLIO, 4, true).unwrap();
    for k in 0..11 {
        w.map(k, pte(FOLIO + 5 + k as u64, RO));
    }
    for k in 0..5 {
        w.map(11 + k, pte(FOLIO + k as u64, RO));
    }
    let (r, rss, _, stats) = w.fork(0, 16);
    assert_eq!((r, rss.anon, stats.batches), (Ok(()), 16, 2));
}

#[test]
fn progress_counter_yields_and_resumes() {
    let mut w = World::new(1, 2048, cow(), cow());
    for k in 0..64 {
        w.folios().add_folio(FOLIO + k, 0, true).unwrap();
        w.map(k as usize, pte(FOLIO + k, RO));
    }
    let mut folios = SimFolios::from_pages(BASE_PFN, &mut w.pages);
    let mut p = SimSpace::<X86Pte>::new(BASE, &mut w.parent);
    let mut c = SimSpace::<X86Pte>::new(BASE, &mut w.child);
    let mut fork = Fork::new(&mut folios, cow(), cow());
    let mut asked = 0;
    let mut yes = || {
        asked += 1;
        true
    };
    // Present entries count 8: the check fires after 4 entries.
    let got = fork.copy_pte_range(&mut c, &mut p, addr(0), addr(64), &mut yes);
    assert_eq!(got, Ok(Progress::Yield(addr(4))));
    let mut no = || false;
    let got = fork.copy_pte_range(&mut c, &mut p, addr(4), addr(64), &mut no);
    assert_eq!(got, Ok(Progress::Done));
    assert_eq!(fork.rss().anon, 64);
    assert_eq!(asked, 1);
}

#[test]
fn bad_ranges_are_rejected() {
    let mut w = World::new(2, 64, cow(), cow());
    let mut folios = SimFolios::from_pages(BASE_PFN, &mut w.pages);
    let mut p = SimSpace::<X86Pte>::new(BASE, &mut w.parent);
    let mut c = SimSpace::<X86Pte>::new(BASE, &mut w.child);
    let mut fork = Fork::new(&mut folios, cow(), cow());
    let mut no = || false;
    assert_eq!(
        fork.copy_range(&mut c, &mut p, addr(1) + 8, addr(4)),
        Err(Error::InvalidRange)
    );
    assert_eq!(
        fork.copy_range(&mut c, &mut p, addr(4), addr(1)),
        Err(Error::InvalidRange)
    );
    assert_eq!(
        fork.copy_pte_range(&mut c, &mut p, addr(0), addr(PTRS_PER_TABLE + 1), &mut no),
        Err(Error::InvalidRange),
        "one table at a time"
    );
    assert_eq!(Error::InvalidRange.errno(), 22);
    assert_eq!(Error::Again.errno(), 11);
    // Addresses outside the model read as none and are skipped.
    assert_eq!(fork.copy_range(&mut c, &mut p, 0, 16 * PAGE_SIZE), Ok(()));
}

#[test]
fn zap_accounts_dirty_and_accessed_once_per_batch_and_flushes_once() {
    let flags = [RO, RO | D, RO, RO & !A, RO, RO, RO, RO];
    let mut w = world(shared(), 3, false, 0, &flags);
    let (r, rss, v) = w.zap(false, 0, 8);
    assert_eq!((r, rss.file, v), (Ok(()), -8, 0));
    assert!(!w.page(FOLIO).used, "last reference dropped: folio freed");
    // Before freeing, dirty was propagated: check on a folio kept alive by an extra ref.
    let mut w = world(shared(), 3, false, 0, &flags);
    w.folios().page_mut(FOLIO).unwrap().refcount += 1;
    let mut folios = SimFolios::from_pages(BASE_PFN, &mut w.pages);
    let mut t = SimSpace::<X86Pte>::new(BASE, &mut w.parent);
    let mut zap = oskit_pte_batch::Zap::new(&mut folios, shared());
    zap.zap_range(&mut t, addr(0), addr(8)).unwrap();
    assert_eq!((zap.stats().batches, zap.stats().tlb_flushes), (1, 1));
    assert_eq!(t.stats().tlb_flushes, 1);
    let head = *folios.page(FOLIO).unwrap();
    assert!(head.dirty && head.accessed);
    assert_eq!((head.refcount, head.total_mapcount), (1, 0));
}
