//! The real x86-64 walker over page tables in ordinary memory (a fake physical address space),
//! checked against the software model.
#![cfg(all(feature = "x86", target_arch = "x86_64"))]

use oskit_pte_batch::hal::PAGE_SIZE;
use oskit_pte_batch::sim::{SimFolios, SimPage, SimSpace};
use oskit_pte_batch::x86::{DirectMap, FrameAlloc, TlbFlush, X86PageTables};
use oskit_pte_batch::{Error, Fork, PageTable, PteFormat, VmFlags, Vma, X86Flags, X86Pte, Zap};

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Frame([u64; 512]);

/// Fake physical memory: frame `i` is physical address `i * 4096`.
struct Phys {
    frames: Vec<Frame>,
}

impl Phys {
    fn new(n: usize) -> Self {
        Self {
            frames: vec![Frame([0; 512]); n],
        }
    }
    fn window(&mut self) -> DirectMap {
        // SAFETY: `frames` is a live allocation of `len * 4096` bytes, not resized while the
        // window is used (the tests keep `Phys` alive and untouched meanwhile).
        unsafe {
            DirectMap::new(
                self.frames.as_mut_ptr() as u64,
                (self.frames.len() * 4096) as u64,
            )
        }
    }
}

/// Hands out frames `[next, end)`.
struct Bump {
    next: u64,
    end: u64,
}

impl FrameAlloc for Bump {
    fn alloc_frame(&mut self) -> Option<u64> {
        (self.next < self.end).then(|| {
            self.next += 1;
            (self.next - 1) * 4096
        })
    }
}

#[derive(Default)]
struct CountTlb(Vec<(u64, u64, u64)>);

impl TlbFlush for &mut CountTlb {
    fn flush_range(&mut self, root: u64, start: u64, end: u64) {
        self.0.push((root, start, end));
    }
}

const USER_BASE: u64 = 0x0000_7f12_3440_0000; // 2 MiB aligned, arbitrary upper indices
const PFN: u64 = 0x8000;

fn flags() -> u64 {
    (X86Flags::PRESENT
        | X86Flags::RW
        | X86Flags::USER
        | X86Flags::ACCESSED
        | X86Flags::DIRTY
        | X86Flags::NX)
        .bits()
}

/// Parent mappings: a 64 KiB anon folio, a 2 MiB file folio across two tables, small pages.
fn layout() -> Vec<(u64, u64)> {
    let mut m = Vec::new();
    for k in 0..16 {
        m.push((USER_BASE + k * PAGE_SIZE, PFN + k));
    }
    for k in 0..512 {
        m.push((USER_BASE + (256 + k) * PAGE_SIZE, PFN + 512 + k));
    }
    for k in 0..8 {
        m.push((USER_BASE + 0x40_0000 + k * 2 * PAGE_SIZE, PFN + 1100 + k));
    }
    m
}

fn metadata(pages: &mut [SimPage]) -> SimFolios<'_> {
    let mut f = SimFolios::new(PFN, pages);
    f.add_folio(PFN, 4, true).unwrap();
    f.add_folio(PFN + 512, 9, false).unwrap();
    for k in 0..8 {
        f.add_folio(PFN + 1100 + k, 0, true).unwrap();
    }
    for (_, pfn) in layout() {
        f.account_mapping(pfn);
    }
    f
}

#[test]
fn fork_and_zap_through_real_tables_match_the_model() {
    let vma = Vma::new(VmFlags::MAYWRITE | VmFlags::WRITE, X86Pte::USER_READONLY);
    let span = (USER_BASE, USER_BASE + 0x60_0000);

    // Model.
    let (mut pm, mut cm) = (vec![0u64; 3 * 512], vec![0u64; 3 * 512]);
    let mut mpages = vec![SimPage::default(); 2048];
    let mut mf = metadata(&mut mpages);
    let mut mp = SimSpace::<X86Pte>::new(USER_BASE, &mut pm);
    let mut mc = SimSpace::<X86Pte>::new(USER_BASE, &mut cm);
    for (va, pfn) in layout() {
        mp.set(va, X86Pte::with_pfn(flags(), pfn));
    }
    let mut fork = Fork::new(&mut mf, vma, vma);
    fork.copy_range(&mut mc, &mut mp, span.0, span.1).unwrap();
    let model_rss = fork.rss();
    drop(fork);

    // Real tables: parent PML4 in frame 1, child PML4 in frame 2.
    let mut phys = Phys::new(64);
    let window = phys.window();
    let mut pages = vec![SimPage::default(); 2048];
    let mut f = metadata(&mut pages);
    let (mut ptlb, mut ctlb) = (CountTlb::default(), CountTlb::default());
    let mut palloc = Bump { next: 3, end: 32 };
    let mut calloc = Bump { next: 32, end: 64 };
    // SAFETY: frames 1 and 2 are zeroed PML4s in `phys`, which outlives the walkers; the
    // allocators hand out disjoint unused frames of `phys`.
    let (mut parent, mut child) = unsafe {
        (
            X86PageTables::new(4096, window, &mut palloc, &mut ptlb),
            X86PageTables::new(2 * 4096, window, &mut calloc, &mut ctlb),
        )
    };
    for (va, pfn) in layout() {
        parent.prepare(va).unwrap();
        parent.set(va, X86Pte::with_pfn(flags(), pfn));
    }
    assert!(!parent.has_table(USER_BASE + 0x60_0000));
    let mut fork = Fork::new(&mut f, vma, vma);
    fork.copy_range(&mut child, &mut parent, span.0, span.1)
        .unwrap();
    assert_eq!(fork.rss(), model_rss);
    assert_eq!(fork.stats().batches, 1 + 2 + 8);
    drop(fork);

    for i in 0..3 * 512u64 {
        let va = USER_BASE + i * PAGE_SIZE;
        assert_eq!(parent.get(va), mp.get(va), "parent {va:#x}");
        assert_eq!(child.get(va), mc.get(va), "child {va:#x}");
    }
    assert_eq!(f.pages(), mf.pages());
    // The parent was write-protected: its TLB is flushed, once per table with changes.
    let _ = parent.into_parts();
    assert_eq!(ptlb.0.len(), 3);
    assert!(ptlb.0.iter().all(|&(root, _, _)| root == 4096));

    // Zap the child through the real tables.
    let mut zap = Zap::new(&mut f, vma);
    zap.zap_range(&mut child, span.0, span.1).unwrap();
    assert_eq!(zap.rss().anon + zap.rss().file, -(layout().len() as i64));
    for i in 0..3 * 512u64 {
        assert_eq!(child.get(USER_BASE + i * PAGE_SIZE), 0);
    }
    let _ = child.into_parts();
    // Fork never flushed the child; the zap flushed each of its three tables once.
    assert_eq!(ctlb.0.len(), 3);
    assert_eq!(f.violations(), 0);
}

#[test]
fn walker_survives_huge_and_wild_upper_entries() {
    let mut phys = Phys::new(8);
    let window = phys.window();
    let mut alloc = Bump { next: 3, end: 5 };
    let mut tlb = CountTlb::default();
    // PML4[0] -> frame 2 (PDPT): entry 0 huge (1 GiB page), entry 1 points far outside memory.
    phys.frames[1].0[0] = (2 * 4096) | 0x7;
    phys.frames[2].0[0] = 0x4000_0000 | 0x87;
    phys.frames[2].0[1] = 0x000f_ffff_ffff_f000 | 0x7;
    // SAFETY: frame 1 is a PML4 in `phys`, which outlives the walker.
    let mut t = unsafe { X86PageTables::new(4096, window, &mut alloc, &mut tlb) };
    assert!(!t.has_table(0));
    assert_eq!(t.get(0x1000), 0);
    t.set(0x1000, 0x1234_5067); // ignored, no table
    assert_eq!(t.prepare(0x1000), Err(Error::HugeMapping { addr: 0x1000 }));
    assert!(!t.has_table(0x4000_0000));
    assert_eq!(t.get(0x4000_0000), 0);
    assert_eq!(t.prepare(0x4000_0000), Err(Error::NoMemory));
    // A fresh region: PML4[1] needs three tables, the allocator has two left.
    assert_eq!(t.prepare(0x80_0000_0000), Err(Error::NoMemory));
    let _ = t.into_parts();
    assert_eq!(
        phys.frames[2].0[0],
        0x4000_0000 | 0x87,
        "huge mapping untouched"
    );
}

#[test]
fn atomic_updates_keep_hardware_bits() {
    let mut phys = Phys::new(8);
    let window = phys.window();
    let mut alloc = Bump { next: 2, end: 8 };
    let mut tlb = CountTlb::default();
    // SAFETY: frame 1 is a zeroed PML4 in `phys`, which outlives the walker.
    let mut t = unsafe { X86PageTables::new(4096, window, &mut alloc, &mut tlb) };
    t.prepare(0x20_0000).unwrap();
    t.set_ptes(0x20_0000, X86Pte::with_pfn(flags(), 0x100), 4);
    t.wrprotect_ptes(0x20_0000, 4);
    for k in 0..4 {
        let e = t.get(0x20_0000 + k * PAGE_SIZE);
        assert_eq!(
            (X86Pte::pfn(e), X86Pte::is_writable(e), X86Pte::is_dirty(e)),
            (0x100 + k, false, true)
        );
    }
    let gathered = t.get_and_clear_ptes(0x20_0000, 4);
    assert!(X86Pte::is_dirty(gathered) && X86Pte::pfn(gathered) == 0x100);
    assert_eq!(t.get(0x20_3000), 0);
}

/// A PMD-level (2 MiB) and a PUD-level (1 GiB) huge entry in the middle of a range: copy and
/// zap handle the tables before it, then report the huge mapping by its address instead of
/// skipping it.
#[test]
fn huge_entries_are_reported_not_skipped() {
    let mut phys = Phys::new(16);
    let window = phys.window();
    // PML4[0] -> PDPT (frame 2); PDPT[0] -> PD (frame 3); PD[0] -> PT (frame 4);
    // PD[1] is a 2 MiB leaf (PS); PDPT[1] is a 1 GiB leaf.
    phys.frames[1].0[0] = (2 * 4096) | 0x7;
    phys.frames[2].0[0] = (3 * 4096) | 0x7;
    phys.frames[3].0[0] = (4 * 4096) | 0x7;
    phys.frames[3].0[1] = 0x4000_0000 | 0xe7; // P RW U A D PS
    phys.frames[2].0[1] = 0x8000_0000 | 0xe7;
    phys.frames[4].0[5] = X86Pte::with_pfn(flags(), PFN);
    let vma = Vma::new(VmFlags::MAYWRITE | VmFlags::WRITE, X86Pte::USER_READONLY);
    let mut pages = vec![SimPage::default(); 64];
    let mut f = SimFolios::new(PFN, &mut pages);
    f.add_folio(PFN, 0, true).unwrap();
    f.account_mapping(PFN);
    let (mut ptlb, mut ctlb) = (CountTlb::default(), CountTlb::default());
    let (mut palloc, mut calloc) = (Bump { next: 5, end: 8 }, Bump { next: 8, end: 16 });
    // SAFETY: frame 1 is the parent's PML4 (frames 2-4 its tables), frame 7 a zeroed PML4
    // for the child; the allocators hand out disjoint unused frames; `phys` outlives both.
    let (mut parent, mut child) = unsafe {
        (
            X86PageTables::new(4096, window, &mut palloc, &mut ptlb),
            X86PageTables::new(7 * 4096, window, &mut calloc, &mut ctlb),
        )
    };
    assert!(!parent.has_table(0x20_0000) && parent.is_huge(0x20_0000));
    assert!(!parent.has_table(0x4000_0000) && parent.is_huge(0x4000_0000));
    assert!(!parent.is_huge(0x80_0000_0000));
    let mut fork = Fork::new(&mut f, vma, vma);
    assert_eq!(
        fork.copy_range(&mut child, &mut parent, 0, 0x40_0000),
        Err(Error::HugeMapping { addr: 0x20_0000 })
    );
    assert_eq!(
        fork.rss().anon,
        1,
        "the table before the huge entry is copied"
    );
    drop(fork);
    let mut fork = Fork::new(&mut f, vma, vma);
    assert_eq!(
        fork.copy_range(&mut child, &mut parent, 0x3fe0_0000, 0x4020_0000),
        Err(Error::HugeMapping { addr: 0x4000_0000 })
    );
    drop(fork);
    assert_eq!(
        oskit_pte_batch::reference::copy_range(
            &mut child,
            &mut parent,
            &mut f,
            vma,
            vma,
            0x20_0000,
            0x40_0000,
            &mut Default::default()
        ),
        Err(Error::HugeMapping { addr: 0x20_0000 })
    );
    let mut zap = Zap::new(&mut f, vma);
    assert_eq!(
        zap.zap_range(&mut parent, 0, 0x40_0000),
        Err(Error::HugeMapping { addr: 0x20_0000 })
    );
    assert_eq!(zap.rss().anon, -1);
    assert_eq!(
        oskit_pte_batch::reference::zap_range(
            &mut parent,
            &mut f,
            vma,
            0x3fe0_0000,
            0x4020_0000,
            &mut Default::default()
        ),
        Err(Error::HugeMapping { addr: 0x4000_0000 })
    );
    let _ = (parent.into_parts(), child.into_parts());
    assert_eq!(
        phys.frames[3].0[1],
        0x4000_0000 | 0xe7,
        "huge entry untouched"
    );
    assert_eq!(f.violations(), 0);
}

/// Another thread sets the accessed and dirty bits of a present entry as the MMU does (a locked
/// read-modify-write that only touches a present entry) while the walker write-protects and
/// clears the same entry in a loop: every bit the "MMU" set is in the value the clear returns.
/// A walker that wrote back a value it had loaded (load + store instead of `fetch_and` /
/// `swap`) would lose some. The operations copy and zap use per entry (`wrprotect_ptes`,
/// `get_and_clear`, `get_and_clear_ptes`) are the ones raced.
#[test]
fn concurrent_accessed_dirty_updates_are_never_lost() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    const A: u64 = X86Flags::ACCESSED.bits();
    const D: u64 = X86Flags::DIRTY.bits();
    const VA: u64 = 0x20_0000;
    let mut phys = Phys::new(8);
    let window = phys.window();
    let mut alloc = Bump { next: 2, end: 8 };
    let mut tlb = CountTlb::default();
    // SAFETY: frame 1 is a zeroed PML4 in `phys`, which outlives the walker and the thread.
    let mut t = unsafe { X86PageTables::new(4096, window, &mut alloc, &mut tlb) };
    t.prepare(VA).unwrap();
    t.set(VA, 0x1234_5000 | 1);
    // The entry's slot: the only frame in `phys` holding that value.
    let slot = phys
        .frames
        .iter()
        .flat_map(|f| f.0.iter())
        .position(|&e| e == 0x1234_5000 | 1)
        .unwrap();
    let slot_addr = phys.frames.as_ptr() as usize + slot * 8;
    t.set(VA, 0);

    let stop = Arc::new(AtomicBool::new(false));
    let updates = Arc::new(AtomicU64::new(0));
    let mmu = {
        let (stop, updates) = (stop.clone(), updates.clone());
        std::thread::spawn(move || {
            // SAFETY: the slot lies in `phys`, alive until this thread is joined; every access
            // to it is atomic.
            let slot = unsafe { AtomicU64::from_ptr(slot_addr as *mut u64) };
            let (mut accessed, mut dirtied) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let cur = slot.load(Ordering::Relaxed);
                if cur & 1 == 0 || cur & (A | D) == A | D {
                    std::hint::spin_loop();
                    continue;
                }
                // A first, then D on a later pass, as a read then a write would.
                let bit = if cur & A == 0 { A } else { D };
                if slot
                    .compare_exchange(cur, cur | bit, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    if bit == A {
                        accessed += 1;
                    } else {
                        dirtied += 1;
                    }
                    updates.fetch_add(1, Ordering::Relaxed);
                }
            }
            (accessed, dirtied)
        })
    };
    let writable = (X86Flags::PRESENT | X86Flags::RW | X86Flags::USER).bits();
    let (mut seen_a, mut seen_d) = (0u64, 0u64);
    let start = std::time::Instant::now();
    let mut rounds = 0u64;
    // Until the MMU has raced a few thousand times (rounds are cheap; the two threads share
    // the CPUs with everything else), at most 10 s.
    // (Under Miri, whose scheduler interleaves the threads itself, a few dozen.)
    let (want, least) = if cfg!(miri) { (40, 10) } else { (4000, 1000) };
    while updates.load(Ordering::Relaxed) < want && start.elapsed().as_secs() < 10 {
        rounds += 1;
        // Present again while empty: the MMU does not touch a non-present entry.
        t.set(VA, X86Pte::with_pfn(writable, 0x100));
        for _ in 0..8 {
            t.wrprotect_ptes(VA, 1);
        }
        let last = if rounds % 2 == 0 {
            t.get_and_clear(VA)
        } else {
            t.get_and_clear_ptes(VA, 1)
        };
        seen_a += u64::from(last & A != 0);
        seen_d += u64::from(last & D != 0);
    }
    stop.store(true, Ordering::Relaxed);
    let (accessed, dirtied) = mmu.join().unwrap();
    let _ = t.into_parts();
    assert_eq!(
        (seen_a, seen_d),
        (accessed, dirtied),
        "bits the MMU set vs bits the clears returned, {rounds} rounds"
    );
    assert!(
        accessed + dirtied >= least,
        "the MMU thread barely ran ({accessed} updates in {rounds} rounds)"
    );
}
