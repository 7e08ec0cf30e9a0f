//! Property tests: the batched copy and zap equal the per-PTE reference on random address
#![allow(clippy::needless_range_loop)]
//! spaces, and keep the accounting invariants.

mod common;

use std::collections::HashSet;

use common::*;
use oskit_pte_batch::{Markers, Migration, NonPresent, PteFormat, Rss, X86Pte};

/// Copies, compares with the reference, then zaps both copies of the world (parent and child)
/// with both implementations and compares again.
fn check_scenario(seed: u64, tables: usize) -> oskit_pte_batch::CopyStats {
    let mut rng = Rng::new(seed);
    let world = random_world(&mut rng, tables);
    let n = world.parent.len();
    let (start, end) = if rng.chance(30) {
        (0, n)
    } else {
        let a = rng.below(n as u64 + 1) as usize;
        let b = rng.below(n as u64 + 1) as usize;
        (a.min(b), a.max(b))
    };
    let original: HashSet<u64> = world
        .pages
        .iter()
        .enumerate()
        .filter(|(_, p)| p.used)
        .map(|(i, _)| BASE_PFN + i as u64)
        .collect();

    let mut b = world.clone();
    let mut r = world.clone();
    let (bres, brss, bviol, stats) = b.fork(start, end);
    let (rres, rrss, rviol) = r.fork_reference(start, end);
    let ctx = format!(
        "seed {seed} range {start}..{end} vma {:?}/{:?}",
        world.src.flags, world.dst.flags
    );
    assert_eq!(bres, rres, "{ctx}: result");
    assert_eq!(bviol, 0, "{ctx}: batched broke refcount >= mapcount");
    assert_eq!(rviol, 0, "{ctx}: reference broke refcount >= mapcount");
    if bres.is_err() {
        // A failed fork is torn down; where exactly it stopped may differ (a batch asks for a
        // preallocated page before the reference reaches the page that needs it).
        for w in [&mut b, &mut r] {
            assert_eq!(w.zap(true, 0, n).0, Ok(()));
            assert_eq!(w.zap(false, 0, n).0, Ok(()));
            assert_no_leaks(w, &ctx);
        }
        return stats;
    }
    assert_eq!(brss, rrss, "{ctx}: rss");
    assert_eq!(b.parent, r.parent, "{ctx}: parent entries");

    let ignored = child_ignored(world.src);
    for i in 0..n {
        let (x, y) = (b.child[i], r.child[i]);
        if X86Pte::is_present(x) && X86Pte::pfn(x) != X86Pte::pfn(y) {
            // Both must be fresh copies with the same contents.
            let (px, py) = (X86Pte::pfn(x), X86Pte::pfn(y));
            assert!(
                !original.contains(&px) && !original.contains(&py),
                "{ctx}: child pfn differs at {i}"
            );
            assert_eq!(
                b.page(px).data,
                r.page(py).data,
                "{ctx}: copied contents at {i}"
            );
            assert_eq!(
                X86Pte::protection(x),
                X86Pte::protection(y),
                "{ctx}: copy protection at {i}"
            );
        } else {
            assert_eq!(
                x & !ignored,
                y & !ignored,
                "{ctx}: child entry {i}: {x:#x} vs {y:#x}"
            );
        }
    }
    // Metadata of every original page.
    for &pfn in &original {
        let (x, y) = (b.page(pfn), r.page(pfn));
        assert_eq!(
            (
                x.used,
                x.refcount,
                x.total_mapcount,
                x.mapcount,
                x.anon_exclusive
            ),
            (
                y.used,
                y.refcount,
                y.total_mapcount,
                y.mapcount,
                y.anon_exclusive
            ),
            "{ctx}: page {pfn:#x}"
        );
    }
    assert_eq!(
        b.pages.iter().filter(|p| p.used).count(),
        r.pages.iter().filter(|p| p.used).count(),
        "{ctx}: pages in use (a preallocated page leaked?)"
    );

    // Linux's rules for non-present entries (`copy_nonpresent_pte`), in both tables.
    for i in start..end {
        for (who, e) in [("parent", b.parent[i]), ("child", b.child[i])] {
            if e == 0 || X86Pte::is_present(e) {
                continue;
            }
            match NonPresent::decode::<X86Pte>(e) {
                NonPresent::Swap { exclusive, .. } => {
                    assert!(!exclusive, "{ctx}: {who} swap entry {i} still exclusive")
                }
                NonPresent::Migration { kind, .. } if world.src.is_cow() => assert_eq!(
                    kind,
                    Migration::Read,
                    "{ctx}: {who} migration entry {i} not made readable"
                ),
                NonPresent::DevicePrivate { write, .. } if world.src.is_cow() => {
                    assert!(!write, "{ctx}: {who} device-private entry {i} writable")
                }
                NonPresent::DeviceExclusive { .. } => {
                    panic!("{ctx}: {who} device-exclusive entry {i} survived a fork")
                }
                NonPresent::Marker(m) if who == "child" => assert!(
                    world.dst.uffd_wp() || !m.contains(Markers::UFFD_WP),
                    "{ctx}: child uffd-wp marker {i} in a child without uffd-wp"
                ),
                _ => {}
            }
            if who == "child" && !world.dst.uffd_wp() {
                assert!(
                    !X86Pte::swp_is_uffd_wp(e),
                    "{ctx}: child swap uffd-wp bit {i}"
                );
            }
        }
    }

    // COW: the child never gets write access to a page its parent still maps.
    if world.src.is_cow() {
        let parent_pfns: HashSet<u64> = b
            .parent
            .iter()
            .filter(|&&e| X86Pte::is_present(e))
            .map(|&e| X86Pte::pfn(e))
            .collect();
        for (i, &e) in b.child.iter().enumerate() {
            if X86Pte::is_present(e) && X86Pte::is_writable(e) {
                assert!(
                    !parent_pfns.contains(&X86Pte::pfn(e)),
                    "{ctx}: child writable shared page at {i}"
                );
            }
            let pe = b.parent[i];
            if X86Pte::is_present(e) && X86Pte::is_present(pe) && X86Pte::pfn(e) == X86Pte::pfn(pe)
            {
                assert!(
                    !X86Pte::is_writable(pe),
                    "{ctx}: parent still writable over a shared page at {i}"
                );
            }
        }
    }
    // Every child entry sharing a page with the parent is old (fresh copies are mapped young).
    for &e in &b.child {
        if X86Pte::is_present(e) && original.contains(&X86Pte::pfn(e)) {
            assert!(!X86Pte::is_young(e), "{ctx}: child entry young");
        }
    }

    // Zap: child then parent over a random range, batched vs reference, plus an oracle for rss.
    let (zs, ze) = if rng.chance(50) {
        (0, n)
    } else {
        let a = rng.below(n as u64 + 1) as usize;
        let c = rng.below(n as u64 + 1) as usize;
        (a.min(c), a.max(c))
    };
    for child in [true, false] {
        let expect = expected_zap_rss(&b, child, zs, ze);
        let (bz, bzr, bzv) = b.zap(child, zs, ze);
        let (rz, rzr, rzv) = r.zap_reference(child, zs, ze);
        assert_eq!(bz, rz, "{ctx}: zap result");
        assert_eq!((bzv, rzv), (0, 0), "{ctx}: zap broke refcount >= mapcount");
        assert_eq!(bzr, rzr, "{ctx}: zap rss (child {child})");
        assert_eq!(bzr, expect, "{ctx}: zap rss oracle (child {child})");
        // Empty, but for the markers `MADV_DONTNEED` keeps: uffd-wp and guard markers, and
        // a uffd-wp marker where a uffd-wp entry of a uffd-wp file mapping was.
        let vma = if child { world.dst } else { world.src };
        let tb = if child { &b.child } else { &b.parent };
        for &e in &tb[zs..ze] {
            if e == 0 {
                continue;
            }
            let kept = match NonPresent::decode::<X86Pte>(e) {
                NonPresent::Marker(m) if !X86Pte::is_present(e) => {
                    m.intersects(Markers::UFFD_WP | Markers::GUARD)
                }
                _ => false,
            };
            assert!(
                b.keep_markers && kept,
                "{ctx}: zapped range holds {e:#x} (vma {:?})",
                vma.flags
            );
        }
    }
    assert_eq!(b.parent, r.parent, "{ctx}: parent after zap");
    for &pfn in &original {
        let (x, y) = (b.page(pfn), r.page(pfn));
        assert_eq!(
            (
                x.used,
                x.refcount,
                x.total_mapcount,
                x.mapcount,
                x.dirty,
                x.accessed
            ),
            (
                y.used,
                y.refcount,
                y.total_mapcount,
                y.mapcount,
                y.dirty,
                y.accessed
            ),
            "{ctx}: page {pfn:#x} after zap"
        );
    }
    // Fully zapped: only pins keep folios alive, and nothing is mapped.
    if (zs, ze) == (0, n) {
        assert_no_leaks(&b, &ctx);
    }
    stats
}

/// After everything is zapped only pins keep folios alive, and nothing is mapped.
fn assert_no_leaks(w: &World, ctx: &str) {
    for (i, p) in w.pages.iter().enumerate() {
        if p.used && p.head == BASE_PFN + i as u64 {
            assert_eq!(p.total_mapcount, 0, "{ctx}: mapped after full zap");
            assert_eq!(
                p.refcount,
                if p.pinned { PIN_BIAS } else { 0 },
                "{ctx}: leaked refs at {i}"
            );
        }
    }
}

/// RSS a zap of `[s, e)` must report, counted from the table and metadata before it (Linux's
/// `zap_pte_range` / `zap_nonpresent_ptes` accounting): swap entries leave the swap count,
/// present, migration and device entries their page's anon or file count; markers and
/// hwpoison entries count nothing.
fn expected_zap_rss(w: &World, child: bool, s: usize, e: usize) -> Rss {
    let t = if child { &w.child } else { &w.parent };
    let mut rss = Rss::default();
    for &pte in &t[s..e] {
        if pte == 0 {
            continue;
        }
        let pfn = if X86Pte::is_present(pte) {
            if X86Pte::is_special(pte) {
                continue;
            }
            X86Pte::pfn(pte)
        } else {
            match NonPresent::decode::<X86Pte>(pte) {
                NonPresent::Swap { .. } => {
                    rss.swap -= 1;
                    continue;
                }
                NonPresent::Migration { pfn, .. }
                | NonPresent::DevicePrivate { pfn, .. }
                | NonPresent::DeviceExclusive { pfn } => pfn,
                NonPresent::Hwpoison { .. } | NonPresent::Marker(_) => continue,
            }
        };
        if !(BASE_PFN..BASE_PFN + w.pages.len() as u64).contains(&pfn) {
            continue;
        }
        let p = w.page(pfn);
        if !p.used {
            continue;
        }
        if w.page(p.head).anon {
            rss.anon -= 1;
        } else {
            rss.file -= 1;
        }
    }
    rss
}

#[test]
fn batched_copy_and_zap_equal_reference_one_table() {
    let (mut present, mut batches, mut copies, mut again) = (0, 0, 0, 0);
    for seed in 0..if cfg!(miri) { 1 } else { 300 } {
        let s = check_scenario(seed, 1);
        (present, batches, copies, again) = (
            present + s.present,
            batches + s.batches,
            copies + s.page_copies,
            again + s.again,
        );
    }
    // The scenarios exercise what they claim to: real batches, pinned copies, retries. (Miri
    // runs a single scenario, too few for these totals.)
    if !cfg!(miri) {
        assert!(
            batches * 2 < present,
            "{batches} batches for {present} entries"
        );
        assert!(
            copies > 10 && again > copies,
            "{copies} copies, {again} retries"
        );
    }
}

#[test]
fn batched_copy_and_zap_equal_reference_four_tables() {
    for seed in 1000..if cfg!(miri) { 1001 } else { 1100 } {
        check_scenario(seed, 4);
    }
}

/// Arbitrary bits in every entry (x86 model and arm64 contiguous model, stray contiguous bits
/// included), arbitrary folio layouts: copy and zap never panic and keep the accounting.
#[test]
fn garbage_tables_never_panic() {
    use oskit_pte_batch::sim::{ContSpace, SimFolios, SimPage, SimSpace};
    use oskit_pte_batch::{Arm64Pte, FolioOps, Fork, PageTable, VmFlags, Vma, Zap};
    const SPAN: u64 = 1024 * 4096;
    for seed in 0..if cfg!(miri) { 2 } else { 200 } {
        let mut rng = Rng::new(seed + 7777);
        let mut pages = vec![SimPage::default(); 512 + 64];
        let mut f = SimFolios::new(BASE_PFN, &mut pages);
        let mut pfn = BASE_PFN;
        while pfn < BASE_PFN + 512 {
            let mut order = rng.below(10) as u8;
            while order > 0 && pfn % (1 << order) != 0 {
                order -= 1;
            }
            f.add_folio(pfn, order, rng.chance(50));
            pfn += 1 << order;
        }
        let arm = seed % 2 == 1;
        let mut entries = vec![0u64; 1024];
        for e in &mut entries {
            let r = rng.next();
            // Half of them point into the metadata's frames so folios are involved.
            *e = if rng.chance(50) {
                (r & !(0xff_ffff_ffffu64 << 12)) | ((BASE_PFN + rng.below(512)) << 12)
            } else {
                r
            };
            let (present, p) = if arm {
                (
                    Arm64Pte::is_present(*e) && !Arm64Pte::is_special(*e),
                    Arm64Pte::pfn(*e),
                )
            } else {
                (
                    X86Pte::is_present(*e) && !X86Pte::is_special(*e),
                    X86Pte::pfn(*e),
                )
            };
            if present {
                if f.folio(p).is_none() && f.page(p).is_some() {
                    *e = 0; // mapping a free frame: corrupt kernel state, outside the contract
                } else {
                    f.account_mapping(p);
                }
            }
        }
        let flags = [
            VmFlags::MAYWRITE | VmFlags::WRITE,
            VmFlags::SHARED,
            VmFlags::MAYWRITE | VmFlags::UFFD_WP,
        ][rng.below(3) as usize];
        let mut child = vec![0u64; 1024];
        if arm {
            let vma = Vma::new(flags, Arm64Pte::USER_READONLY);
            let mut p = ContSpace::new(BASE, &mut entries);
            let mut c = ContSpace::new(BASE, &mut child);
            let mut fork = Fork::new(&mut f, vma, vma);
            let _ = fork.copy_range(&mut c, &mut p, BASE, BASE + SPAN);
            drop(fork);
            for t in [&mut c, &mut p] {
                Zap::new(&mut f, vma)
                    .zap_range(t, BASE, BASE + SPAN)
                    .unwrap();
                assert!(
                    (0..1024u64).all(|i| t.get(BASE + i * 4096) == 0),
                    "seed {seed}"
                );
            }
        } else {
            let vma = Vma::new(flags, X86Pte::USER_READONLY);
            let mut p = SimSpace::<X86Pte>::new(BASE, &mut entries);
            let mut c = SimSpace::<X86Pte>::new(BASE, &mut child);
            let mut fork = Fork::new(&mut f, vma, vma);
            let _ = fork.copy_range(&mut c, &mut p, BASE, BASE + SPAN);
            drop(fork);
            for t in [&mut c, &mut p] {
                Zap::new(&mut f, vma)
                    .zap_range(t, BASE, BASE + SPAN)
                    .unwrap();
                assert!(t.entries().iter().all(|&e| e == 0), "seed {seed}");
            }
        }
        assert_eq!(f.violations(), 0, "seed {seed}");
        for p in f.pages() {
            assert!(
                p.mapcount == 0 && p.total_mapcount == 0 && p.refcount == 0,
                "seed {seed}: {p:?}"
            );
        }
    }
}

/// `copy_pte_range` asked to reschedule now and then, resumed where it yielded, ends exactly
/// where one uninterrupted `copy_range` does (entries, metadata, RSS and counters): the loop
/// that keeps the progress counter behaves like the one that drops it.
#[test]
fn rescheduled_copy_equals_uninterrupted_copy() {
    use oskit_pte_batch::hal::table_end;
    use oskit_pte_batch::sim::{SimFolios, SimSpace};
    use oskit_pte_batch::{Fork, PageTable, Progress};
    let mut yields = 0;
    for seed in 3000..if cfg!(miri) { 3002 } else { 3150 } {
        let mut rng = Rng::new(seed);
        let world = random_world(&mut rng, 2);
        let n = world.parent.len();
        let every = 1 + rng.below(6);

        let mut straight = world.clone();
        let (sres, srss, sviol, sstats) = straight.fork(0, n);

        let mut w = world.clone();
        let (src, dst) = (w.src, w.dst);
        let mut folios = SimFolios::from_pages(BASE_PFN, &mut w.pages);
        folios.set_restore_device_exclusive(world.restore);
        folios.set_swap_count_full(world.swap_full);
        let mut p = SimSpace::<X86Pte>::new(BASE, &mut w.parent);
        let mut c = SimSpace::<X86Pte>::new(BASE, &mut w.child);
        let mut fork = Fork::new(&mut folios, src, dst);
        let mut asked = 0u64;
        let mut res = Ok(());
        let mut a = addr(0);
        'tables: while a < addr(n) {
            let next = table_end(a).unwrap().min(addr(n));
            c.prepare(a).unwrap();
            loop {
                let mut need_resched = || {
                    asked += 1;
                    asked % every == 0
                };
                match fork.copy_pte_range(&mut c, &mut p, a, next, &mut need_resched) {
                    Ok(Progress::Done) => break,
                    Ok(Progress::Yield(at)) => {
                        assert!(
                            at > a || at == a && asked % every == 0,
                            "seed {seed}: progress"
                        );
                        yields += 1;
                        a = at;
                    }
                    Err(e) => {
                        res = Err(e);
                        break 'tables;
                    }
                }
            }
            a = next;
        }
        let (rss, stats) = (fork.rss(), fork.stats());
        drop(fork);
        let ctx = format!("seed {seed} every {every}");
        assert_eq!(res, sres, "{ctx}: result");
        if sres.is_err() {
            continue;
        }
        assert_eq!(folios.violations(), sviol, "{ctx}: violations");
        assert_eq!(rss, srss, "{ctx}: rss");
        assert_eq!(w.parent, straight.parent, "{ctx}: parent");
        assert_eq!(w.child, straight.child, "{ctx}: child");
        assert_eq!(w.pages, straight.pages, "{ctx}: page metadata");
        assert_eq!(
            (
                stats.present,
                stats.batches,
                stats.nonpresent,
                stats.page_copies
            ),
            (
                sstats.present,
                sstats.batches,
                sstats.nonpresent,
                sstats.page_copies
            ),
            "{ctx}: counters"
        );
    }
    let enough = if cfg!(miri) { 1 } else { 100 };
    assert!(yields >= enough, "the loop yielded ({yields} times)");
}

/// A table that records its TLB range flushes, forwarding everything else to the model.
struct Flushes<'a> {
    table: oskit_pte_batch::sim::SimSpace<'a, X86Pte>,
    ranges: Vec<(u64, u64)>,
}

impl oskit_pte_batch::PageTable for Flushes<'_> {
    type Format = X86Pte;
    fn get(&self, addr: u64) -> u64 {
        self.table.get(addr)
    }
    fn set(&mut self, addr: u64, pte: u64) {
        self.table.set(addr, pte)
    }
    fn raw_entries(&self, addr: u64, nr: usize) -> Option<&[u64]> {
        self.table.raw_entries(addr, nr)
    }
    fn set_ptes(&mut self, addr: u64, pte: u64, nr: usize) {
        self.table.set_ptes(addr, pte, nr)
    }
    fn wrprotect_ptes(&mut self, addr: u64, nr: usize) {
        self.table.wrprotect_ptes(addr, nr)
    }
    fn flush_tlb_range(&mut self, start: u64, end: u64) {
        self.ranges.push((start, end));
    }
}

/// The parent's TLB is flushed once per table over every entry write-protected there, as the
/// reference does.
#[test]
fn parent_tlb_flushes_cover_the_write_protected_entries() {
    use oskit_pte_batch::hal::table_end;
    use oskit_pte_batch::sim::{SimFolios, SimSpace};
    use oskit_pte_batch::{Fork, reference};
    let mut flushed = 0;
    for seed in 5000..if cfg!(miri) { 5002 } else { 5150 } {
        let mut rng = Rng::new(seed);
        let world = random_world(&mut rng, 2);
        let n = world.parent.len();
        let mut ranges = Vec::new();
        let mut parents = Vec::new();
        for batched in [true, false] {
            let mut w = world.clone();
            let (src, dst) = (w.src, w.dst);
            let mut folios = SimFolios::from_pages(BASE_PFN, &mut w.pages);
            let mut p = Flushes {
                table: SimSpace::new(BASE, &mut w.parent),
                ranges: Vec::new(),
            };
            let mut c = SimSpace::<X86Pte>::new(BASE, &mut w.child);
            let r = if batched {
                Fork::new(&mut folios, src, dst).copy_range(&mut c, &mut p, addr(0), addr(n))
            } else {
                let mut rss = Rss::default();
                reference::copy_range(
                    &mut c,
                    &mut p,
                    &mut folios,
                    src,
                    dst,
                    addr(0),
                    addr(n),
                    &mut rss,
                )
            };
            if r.is_err() {
                break;
            }
            ranges.push(p.ranges);
            parents.push(w.parent);
        }
        if ranges.len() < 2 {
            continue;
        }
        // One flush per table with write-protected entries, over a span containing the
        // reference's (a batch write-protects all its entries if any was writable, so its
        // span may start or end a little further out), inside the table.
        assert_eq!(ranges[0].len(), ranges[1].len(), "seed {seed}: flushes");
        for (&(s, e), &(rs, re)) in ranges[0].iter().zip(&ranges[1]) {
            assert!(
                s <= rs && re <= e,
                "seed {seed}: {s:#x}..{e:#x} within {rs:#x}..{re:#x}"
            );
            assert_eq!(
                table_end(s),
                table_end(e - 1),
                "seed {seed}: one table per flush"
            );
        }
        for i in 0..n {
            let (before, after) = (world.parent[i], parents[0][i]);
            if X86Pte::is_writable(before) && !X86Pte::is_writable(after) {
                assert!(
                    ranges[0].iter().any(|&(s, e)| s <= addr(i) && addr(i) < e),
                    "seed {seed}: entry {i} write-protected but not flushed"
                );
            }
        }
        flushed += ranges[0].len();
    }
    let enough = if cfg!(miri) { 1 } else { 100 };
    assert!(flushed >= enough, "the copies flushed ({flushed} ranges)");
}
