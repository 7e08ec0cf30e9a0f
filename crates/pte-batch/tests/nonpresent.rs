//! Non-present entries: the x86 and arm64 swap layouts, and Linux's fork and zap rule for each
//! flavor, one test each, on the batched code and the per-PTE reference alike.

mod common;

use common::*;
use oskit_pte_batch::hal::PTRS_PER_TABLE;
use oskit_pte_batch::nonpresent::{SWP_DEVICE_EXCLUSIVE, SWP_MIGRATION_WRITE, SWP_PTE_MARKER};
use oskit_pte_batch::sim::{SimFolios, SimPage, SimSpace};
use oskit_pte_batch::zap::{SWAP_BATCH, Zap};
use oskit_pte_batch::{
    Arm64Pte, Error, Markers, Migration, NonPresent, PteFormat, VmFlags, Vma, X86Pte,
};

const FOLIO: u64 = BASE_PFN;

fn cow(extra: VmFlags) -> Vma {
    Vma::new(
        VmFlags::MAYWRITE | VmFlags::WRITE | extra,
        X86Pte::USER_READONLY,
    )
}

/// A world with a 16-page anon folio at FOLIO and `entries` in the parent from index 0 (device
/// entries accounted like mappings).
fn world(src: Vma, dst: Vma, entries: &[u64]) -> World {
    let mut w = World::new(1, 1024, src, dst);
    w.folios().add_folio(FOLIO, 4, true).unwrap();
    for (i, &e) in entries.iter().enumerate() {
        w.map(i, e);
    }
    w
}

/// Runs the batched and the reference copy; they must agree; returns the batched world.
fn fork_both(w: &World, n: usize) -> (World, Result<(), Error>, oskit_pte_batch::Rss) {
    let (mut b, mut r) = (w.clone(), w.clone());
    let (res, rss, v, _) = b.fork(0, n);
    let (rres, rrss, rv) = r.fork_reference(0, n);
    assert_eq!((res, v), (rres, rv), "batched vs reference result");
    if res.is_ok() {
        assert_eq!(rss, rrss);
        assert_eq!((&b.parent, &b.child), (&r.parent, &r.child));
        assert_eq!(b.pages, r.pages);
    }
    (b, res, rss)
}

#[test]
fn x86_swap_layout() {
    let e = NonPresent::Swap {
        ty: 3,
        offset: 0x1234,
        exclusive: true,
    }
    .encode::<X86Pte>();
    assert!(!X86Pte::is_present(e) && !X86Pte::is_none(e) && !X86Pte::is_protnone(e));
    assert_eq!(e & (1 << 7), 1 << 7, "_PAGE_SWP_EXCLUSIVE is bit 7");
    assert_eq!(e >> 59, 3, "type in bits 59-63");
    assert_eq!(
        (!e >> 9) & ((1 << 50) - 1),
        0x1234,
        "offset inverted in bits 9-58"
    );
    assert_eq!(
        NonPresent::decode::<X86Pte>(e),
        NonPresent::Swap {
            ty: 3,
            offset: 0x1234,
            exclusive: true
        }
    );
    let m = X86Pte::swp_mk_uffd_wp(X86Pte::swp_mk_soft_dirty(X86Pte::mk_swp_entry(
        SWP_MIGRATION_WRITE,
        0xabcde,
    )));
    assert_eq!(m & 0b110, 0b110, "soft-dirty bit 1, uffd-wp bit 2");
    assert_eq!(
        NonPresent::decode::<X86Pte>(m),
        NonPresent::Migration {
            pfn: 0xabcde,
            kind: Migration::Write
        }
    );
}

#[test]
fn arm64_swap_layout() {
    let e = NonPresent::DevicePrivate {
        pfn: 0x5_4321,
        write: true,
    }
    .encode::<Arm64Pte>();
    assert!(!Arm64Pte::is_present(e) && !Arm64Pte::is_none(e));
    assert_eq!((e >> 6) & 0x1f, 28, "type in bits 6-10");
    assert_eq!(e >> 12, 0x5_4321, "offset from bit 12");
    let s = NonPresent::Swap {
        ty: 1,
        offset: 99,
        exclusive: true,
    }
    .encode::<Arm64Pte>();
    assert_eq!(s & (1 << 2), 1 << 2, "exclusive is bit 2");
    assert_eq!(Arm64Pte::swp_offset(s), 99);
    // The largest offset never reaches the model's PROT_NONE bit.
    let top = Arm64Pte::mk_swp_entry(SWP_PTE_MARKER, u64::MAX);
    assert!(!Arm64Pte::is_present(top));
}

#[test]
fn fork_makes_an_exclusive_swap_entry_shared_in_both() {
    let vma = cow(VmFlags::empty());
    let excl = X86Pte::swp_mk_soft_dirty(
        NonPresent::Swap {
            ty: 0,
            offset: 0x91a,
            exclusive: true,
        }
        .encode::<X86Pte>(),
    );
    let w = world(vma, vma, &[excl]);
    let (b, res, rss) = fork_both(&w, 1);
    assert_eq!(res, Ok(()));
    assert_eq!(rss.swap, 1);
    assert_eq!(
        b.parent[0],
        excl & !(1 << 7),
        "parent: exclusive cleared, rest kept"
    );
    assert_eq!(b.child[0], b.parent[0]);
}

#[test]
fn swap_count_continuation_is_added_and_the_entry_retried() {
    let vma = cow(VmFlags::empty());
    let e = NonPresent::Swap {
        ty: 0,
        offset: 7,
        exclusive: false,
    }
    .encode::<X86Pte>();
    let mut w = world(vma, vma, &[e, e]);
    w.swap_full = 2;
    let (b, res, rss) = fork_both(&w, 2);
    assert_eq!((res, rss.swap), (Ok(()), 2));
    assert_eq!(b.child[..2], [e, e]);
    // No page for the continuation: ENOMEM, nothing half-done at the entry.
    let mut b = w.clone();
    {
        let (mut p, mut c) = (b.parent.clone(), b.child.clone());
        let mut f = b.folios();
        f.set_alloc_budget(Some(0));
        let mut ps = oskit_pte_batch::sim::SimSpace::<X86Pte>::new(BASE, &mut p);
        let mut cs = oskit_pte_batch::sim::SimSpace::<X86Pte>::new(BASE, &mut c);
        let mut fork = oskit_pte_batch::Fork::new(&mut f, vma, vma);
        assert_eq!(
            fork.copy_range(&mut cs, &mut ps, addr(0), addr(2)),
            Err(Error::NoMemory)
        );
        assert_eq!(fork.rss().swap, 0);
    }
}

#[test]
fn fork_makes_writable_migration_entries_readable_in_a_cow_mapping() {
    for dst_uffd in [false, true] {
        let src = cow(VmFlags::UFFD_WP);
        let dst = if dst_uffd { src } else { cow(VmFlags::empty()) };
        let write = NonPresent::Migration {
            pfn: FOLIO + 3,
            kind: Migration::Write,
        }
        .encode::<X86Pte>();
        let write = X86Pte::swp_mk_uffd_wp(X86Pte::swp_mk_soft_dirty(write));
        let excl = NonPresent::Migration {
            pfn: FOLIO + 4,
            kind: Migration::ReadExclusive,
        }
        .encode::<X86Pte>();
        let w = world(src, dst, &[write, excl]);
        let (b, res, rss) = fork_both(&w, 2);
        assert_eq!((res, rss.anon), (Ok(()), 2));
        let read = |pfn| {
            NonPresent::Migration {
                pfn,
                kind: Migration::Read,
            }
            .encode::<X86Pte>()
        };
        let read3 = X86Pte::swp_mk_uffd_wp(X86Pte::swp_mk_soft_dirty(read(FOLIO + 3)));
        assert_eq!(b.parent[..2], [read3, read(FOLIO + 4)]);
        let child3 = if dst_uffd {
            read3
        } else {
            X86Pte::swp_clear_uffd_wp(read3)
        };
        assert_eq!(b.child[..2], [child3, read(FOLIO + 4)]);
    }
    // A shared mapping keeps them as they are.
    let shared = Vma::new(
        VmFlags::SHARED | VmFlags::MAYWRITE | VmFlags::WRITE,
        X86Pte::USER_READONLY,
    );
    let write = X86Pte::mk_swp_entry(SWP_MIGRATION_WRITE, FOLIO);
    let (b, _, _) = fork_both(&world(shared, shared, &[write]), 1);
    assert_eq!((b.parent[0], b.child[0]), (write, write));
}

#[test]
fn fork_duplicates_a_device_private_page_like_a_present_one() {
    let vma = cow(VmFlags::empty());
    let dev = NonPresent::DevicePrivate {
        pfn: FOLIO + 5,
        write: true,
    }
    .encode::<X86Pte>();
    let w = world(vma, vma, &[dev]);
    let before = *w.page(FOLIO + 5);
    let (mut b, res, rss) = fork_both(&w, 1);
    assert_eq!((res, rss.anon), (Ok(()), 1));
    let read = NonPresent::DevicePrivate {
        pfn: FOLIO + 5,
        write: false,
    }
    .encode::<X86Pte>();
    assert_eq!((b.parent[0], b.child[0]), (read, read));
    assert_eq!(b.page(FOLIO).refcount, w.page(FOLIO).refcount + 1);
    assert_eq!(b.page(FOLIO + 5).mapcount, before.mapcount + 1);
    // Zapping the child gives both back (after the flush: checked by `World::zap`).
    let (r, zrss, v) = b.zap(true, 0, 1);
    assert_eq!((r, zrss.anon, v), (Ok(()), -1, 0));
    assert_eq!(b.page(FOLIO).refcount, w.page(FOLIO).refcount);
    assert_eq!(b.page(FOLIO + 5).mapcount, before.mapcount);
}

#[test]
fn device_exclusive_entry_fails_fork_unless_restored() {
    let vma = cow(VmFlags::empty());
    let dev = X86Pte::mk_swp_entry(SWP_DEVICE_EXCLUSIVE, FOLIO + 2);
    let mut w = world(vma, vma, &[0, dev]);
    let (_, res, _) = fork_both(&w, 2);
    assert_eq!(res, Err(Error::DeviceExclusive { addr: addr(1) }));
    w.restore = true;
    let (b, res, rss) = fork_both(&w, 2);
    assert_eq!((res, rss.anon), (Ok(()), 1));
    // Present again in the parent, shared copy-on-write with the child.
    for e in [b.parent[1], b.child[1]] {
        assert!(X86Pte::is_present(e) && !X86Pte::is_writable(e));
        assert_eq!(X86Pte::pfn(e), FOLIO + 2);
    }
    assert_eq!(b.page(FOLIO + 2).mapcount, 2);
}

#[test]
fn markers_are_copied_and_zapped_as_linux_does() {
    let src = cow(VmFlags::UFFD_WP | VmFlags::FILE);
    let marker = |m: Markers| NonPresent::Marker(m).encode::<X86Pte>();
    let entries = [
        marker(Markers::UFFD_WP),
        marker(Markers::POISONED),
        marker(Markers::GUARD),
        marker(Markers::UFFD_WP | Markers::GUARD),
    ];
    // A child without uffd-wp gets the poisoned and guard markers only.
    let (b, res, rss) = fork_both(&world(src, cow(VmFlags::FILE), &entries), 4);
    assert_eq!((res, rss), (Ok(()), Default::default()));
    assert_eq!(
        b.child[..4],
        [0, entries[1], entries[2], marker(Markers::GUARD)]
    );
    let (b, _, _) = fork_both(&world(src, src, &entries), 4);
    assert_eq!(b.child[..4], entries);

    // munmap drops every marker; MADV_DONTNEED keeps uffd-wp and guard markers and leaves a
    // uffd-wp marker where a uffd-wp entry of this uffd-wp file mapping was.
    let uffd_page = pte(FOLIO, P | US | A | UFFD);
    let mut all = entries.to_vec();
    all.push(uffd_page);
    let mut w = world(src, src, &all);
    let mut dontneed = w.clone();
    assert_eq!(w.zap(false, 0, 5).0, Ok(()));
    assert!(w.parent[..5].iter().all(|&e| e == 0));
    dontneed.keep_markers = true;
    let mut reference = dontneed.clone();
    let (r, rss, _) = dontneed.zap(false, 0, 5);
    assert_eq!((r, rss.anon), (Ok(()), -1));
    assert_eq!(
        dontneed.parent[..5],
        [
            entries[0],
            0,
            entries[2],
            entries[3],
            marker(Markers::UFFD_WP)
        ]
    );
    assert_eq!(reference.zap_reference(false, 0, 5).0, Ok(()));
    assert_eq!(reference.parent, dontneed.parent);
}

/// Swap entries of `ty` and `slot` (anon-exclusive), soft-dirty or not, in format `F`.
fn swp<F: PteFormat>(ty: u32, slot: u64, soft_dirty: bool) -> u64 {
    let e = NonPresent::Swap {
        ty,
        offset: slot,
        exclusive: true,
    }
    .encode::<F>();
    if soft_dirty {
        F::swp_mk_soft_dirty(e)
    } else {
        e
    }
}

/// One table of swap entries whose runs end every way a run can: a flag change, a slot gap,
/// another device, [`SWAP_BATCH`], and the zapped range's end (105). Returns the entries and
/// how many runs and entries a zap of `0..105` meets.
fn swap_runs<F: PteFormat>() -> (Vec<u64>, u64, u64) {
    let mut e = vec![0u64; PTRS_PER_TABLE];
    // Entries `from..to` on device `ty`, slots from `slot` up.
    let mut fill = |from: usize, to: usize, ty: u32, slot: u64, soft_dirty: bool| {
        for (k, entry) in e[from..to].iter_mut().enumerate() {
            *entry = swp::<F>(ty, slot + k as u64, soft_dirty);
        }
    };
    // A swapped-out 64 KiB folio: one run.
    fill(0, 16, 1, 0x100, false);
    // The slots go on, soft-dirty now: a run of its own.
    fill(16, 20, 1, 0x110, true);
    // A gap after the second slot: two runs.
    fill(20, 22, 1, 0x200, false);
    fill(22, 24, 1, 0x203, false);
    // The next slots, on another device: one run.
    fill(24, 26, 2, 0x205, false);
    // 40 consecutive slots: SWAP_BATCH, then the rest.
    fill(32, 72, 1, 0x1000, false);
    // Ten more, of which the zap takes five.
    fill(100, 110, 1, 0x3000, false);
    assert_eq!(SWAP_BATCH, 32, "the run of 40 below is split 32 + 8");
    (e, 8, 16 + 4 + 4 + 2 + 40 + 5)
}

fn zap_swap_runs<F: PteFormat>() {
    let (mut entries, runs, swapped) = swap_runs::<F>();
    let untouched = entries[105..].to_vec();
    let mut pages = vec![SimPage::default(); 16];
    let mut folios = SimFolios::new(BASE_PFN, &mut pages);
    let mut table = SimSpace::<F>::new(BASE, &mut entries);
    let mut zap = Zap::new(&mut folios, cow(VmFlags::empty()));
    assert_eq!(zap.zap_range(&mut table, addr(0), addr(105)), Ok(()));
    let (stats, rss) = (zap.stats(), zap.rss());
    assert_eq!(
        (stats.nonpresent, stats.swap_batches, stats.present),
        (swapped, runs, 0),
        "entries zapped, runs freed at once"
    );
    assert_eq!(rss.swap, -(swapped as i64));
    assert_eq!(
        folios.swap_refs(),
        -(swapped as i64),
        "one slot reference each"
    );
    assert!(
        entries[..105].iter().all(|&e| e == 0),
        "every entry cleared"
    );
    assert_eq!(entries[105..], untouched[..], "nothing past the range");
}

/// A zap frees a run of swap entries at once (the same device, consecutive slots, the same
/// flags: Linux's `swap_pte_batch` + `free_swap_and_cache_nr`), in both formats (x86 keeps the
/// offset inverted).
#[test]
fn zap_frees_a_run_of_swap_entries_at_once() {
    zap_swap_runs::<X86Pte>();
    zap_swap_runs::<Arm64Pte>();
}

/// The batched zap of those runs leaves the same tables, counts and slot references as the
/// per-PTE reference, which frees each entry on its own.
#[test]
fn swap_runs_zap_like_the_per_pte_reference() {
    let (entries, _, swapped) = swap_runs::<X86Pte>();
    let mut w = World::new(1, 16, cow(VmFlags::empty()), cow(VmFlags::empty()));
    w.parent.copy_from_slice(&entries);
    let mut reference = w.clone();
    let (r, rss, bad) = w.zap(false, 0, 105);
    let (rr, rrss, rbad) = reference.zap_reference(false, 0, 105);
    assert_eq!((r, rss, bad), (rr, rrss, rbad));
    assert_eq!(rss.swap, -(swapped as i64));
    assert_eq!(w.parent, reference.parent);
}
