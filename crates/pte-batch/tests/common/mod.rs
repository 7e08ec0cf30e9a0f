//! Shared test scaffolding: a seeded PRNG, random address spaces, and a batched-vs-reference
//! comparison on the software model.
#![allow(dead_code, unreachable_pub)]

use oskit_pte_batch::hal::{PAGE_SIZE, PTRS_PER_TABLE};
use std::cell::RefCell;

use oskit_pte_batch::sim::{OrderLog, Ordered, SimFolios, SimPage, SimSpace};
use oskit_pte_batch::{
    Error, Fork, Markers, Migration, NonPresent, PteFormat, Rss, VmFlags, Vma, X86Flags, X86Pte,
    Zap, reference,
};

/// xorshift64*.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

pub const BASE: u64 = 0x7f00_0000_0000;
pub const BASE_PFN: u64 = 0x10_0000;
/// Frames beyond the store: no struct page.
pub const NOPAGE_PFN: u64 = 0xfe_0000;
pub const PIN_BIAS: i64 = 1024;

pub const P: u64 = X86Flags::PRESENT.bits();
pub const RW: u64 = X86Flags::RW.bits();
pub const US: u64 = X86Flags::USER.bits();
pub const A: u64 = X86Flags::ACCESSED.bits();
pub const D: u64 = X86Flags::DIRTY.bits();
pub const G: u64 = X86Flags::GLOBAL.bits();
pub const SPECIAL: u64 = X86Flags::SPECIAL.bits();
pub const UFFD: u64 = X86Flags::UFFD_WP.bits();
pub const SD: u64 = X86Flags::SOFT_DIRTY.bits();
pub const NX: u64 = X86Flags::NX.bits();

pub fn pte(pfn: u64, flags: u64) -> u64 {
    X86Pte::with_pfn(flags, pfn)
}

/// A swap entry: not present, not PROT_NONE, nonzero.
pub fn swap_entry(slot: u64, uffd: bool) -> u64 {
    (slot << 12) | 0x40 | if uffd { X86Pte::SWP_UFFD_WP } else { 0 }
}

pub fn addr(i: usize) -> u64 {
    BASE + i as u64 * PAGE_SIZE
}

/// One address space (parent and child tables) and its page metadata, owned.
#[derive(Clone)]
pub struct World {
    pub parent: Vec<u64>,
    pub child: Vec<u64>,
    pub pages: Vec<SimPage>,
    pub src: Vma,
    pub dst: Vma,
    /// A device revokes device-exclusive access when fork asks.
    pub restore: bool,
    /// `swap_dup` calls that report a full swap count (each needs a continuation).
    pub swap_full: u32,
    /// Zap as `MADV_DONTNEED` (markers kept) rather than munmap.
    pub keep_markers: bool,
}

impl World {
    pub fn new(tables: usize, frames: usize, src: Vma, dst: Vma) -> Self {
        let mut pages = vec![SimPage::default(); frames];
        SimFolios::new(BASE_PFN, &mut pages);
        Self {
            parent: vec![0; tables * PTRS_PER_TABLE],
            child: vec![0; tables * PTRS_PER_TABLE],
            pages,
            src,
            dst,
            restore: false,
            swap_full: 0,
            keep_markers: false,
        }
    }

    pub fn folios(&mut self) -> SimFolios<'_> {
        let mut f = SimFolios::from_pages(BASE_PFN, &mut self.pages);
        f.set_restore_device_exclusive(self.restore);
        f.set_swap_count_full(self.swap_full);
        f
    }

    pub fn page(&self, pfn: u64) -> &SimPage {
        &self.pages[(pfn - BASE_PFN) as usize]
    }

    /// Maps `pte` at entry `i` of the parent and accounts it (a present page, or a device
    /// entry, which holds a mapping and a reference too).
    pub fn map(&mut self, i: usize, pte: u64) {
        self.parent[i] = pte;
        if let Some(pfn) = mapped_pfn(pte) {
            let mut f = self.folios();
            f.account_mapping(pfn);
        }
    }

    /// Batched copy of `[start, end)` (entry indices). Returns result, rss, violations.
    pub fn fork(
        &mut self,
        start: usize,
        end: usize,
    ) -> (Result<(), Error>, Rss, u64, oskit_pte_batch::CopyStats) {
        let (src, dst) = (self.src, self.dst);
        let mut folios = SimFolios::from_pages(BASE_PFN, &mut self.pages);
        folios.set_restore_device_exclusive(self.restore);
        folios.set_swap_count_full(self.swap_full);
        let mut p = SimSpace::<X86Pte>::new(BASE, &mut self.parent);
        let mut c = SimSpace::<X86Pte>::new(BASE, &mut self.child);
        let mut fork = Fork::new(&mut folios, src, dst);
        let r = fork.copy_range(&mut c, &mut p, addr(start), addr(end));
        let rss = fork.rss();
        let stats = fork.stats();
        drop(fork);
        (r, rss, folios.violations(), stats)
    }

    /// Reference copy.
    pub fn fork_reference(&mut self, start: usize, end: usize) -> (Result<(), Error>, Rss, u64) {
        let (src, dst) = (self.src, self.dst);
        let mut folios = SimFolios::from_pages(BASE_PFN, &mut self.pages);
        folios.set_restore_device_exclusive(self.restore);
        folios.set_swap_count_full(self.swap_full);
        let mut p = SimSpace::<X86Pte>::new(BASE, &mut self.parent);
        let mut c = SimSpace::<X86Pte>::new(BASE, &mut self.child);
        let mut rss = Rss::default();
        let r = reference::copy_range(
            &mut c,
            &mut p,
            &mut folios,
            src,
            dst,
            addr(start),
            addr(end),
            &mut rss,
        );
        (r, rss, folios.violations())
    }

    /// Batched zap of the parent (`child == false`) or child table.
    pub fn zap(&mut self, child: bool, start: usize, end: usize) -> (Result<(), Error>, Rss, u64) {
        let vma = if child { self.dst } else { self.src };
        let mut folios = SimFolios::from_pages(BASE_PFN, &mut self.pages);
        let entries = if child {
            &mut self.child
        } else {
            &mut self.parent
        };
        let log = RefCell::new(OrderLog::new());
        let mut t = Ordered::new(SimSpace::<X86Pte>::new(BASE, entries), &log);
        let mut of = Ordered::new(&mut folios, &log);
        let zap = Zap::new(&mut of, vma);
        let mut zap = if self.keep_markers {
            zap.keep_markers()
        } else {
            zap
        };
        let r = zap.zap_range(&mut t, addr(start), addr(end));
        let rss = zap.rss();
        check_order(&log.borrow(), "batched zap");
        (r, rss, folios.violations())
    }

    pub fn zap_reference(
        &mut self,
        child: bool,
        start: usize,
        end: usize,
    ) -> (Result<(), Error>, Rss, u64) {
        let vma = if child { self.dst } else { self.src };
        let mut folios = SimFolios::from_pages(BASE_PFN, &mut self.pages);
        let entries = if child {
            &mut self.child
        } else {
            &mut self.parent
        };
        let log = RefCell::new(OrderLog::new());
        let mut t = Ordered::new(SimSpace::<X86Pte>::new(BASE, entries), &log);
        let mut of = Ordered::new(&mut folios, &log);
        let mut rss = Rss::default();
        let r = reference::zap_range_with(
            &mut t,
            &mut of,
            vma,
            self.keep_markers,
            addr(start),
            addr(end),
            &mut rss,
        );
        check_order(&log.borrow(), "reference zap");
        (r, rss, folios.violations())
    }
}

/// Every rmap removal and reference drop came after the TLB flush covering the page's entries.
pub fn check_order(log: &OrderLog, what: &str) {
    assert!(!log.overflowed(), "{what}: order log overflowed");
    assert_eq!(
        log.violations(),
        0,
        "{what}: page released before the TLB flush of its entry (address, pfn) {:?}",
        log.first_violation()
    );
}

/// The page an entry holds a mapping of: a present entry's (not special), a device entry's.
pub fn mapped_pfn(pte: u64) -> Option<u64> {
    if X86Pte::is_none(pte) {
        return None;
    }
    if X86Pte::is_present(pte) {
        return (!X86Pte::is_special(pte)).then(|| X86Pte::pfn(pte));
    }
    match NonPresent::decode::<X86Pte>(pte) {
        NonPresent::DevicePrivate { pfn, .. } | NonPresent::DeviceExclusive { pfn } => Some(pfn),
        _ => None,
    }
}

/// A random non-present entry of every flavor (device and hwpoison ones for `pfn`, migration
/// ones for `held`, a page something else keeps alive; a swap entry without one), with random
/// soft-dirty and (in a uffd-wp mapping) uffd-wp bits.
pub fn random_nonpresent(rng: &mut Rng, pfn: u64, held: Option<u64>, src: Vma) -> u64 {
    let mut k = rng.below(12);
    if held.is_none() && (4..=6).contains(&k) {
        k = 0;
    }
    let mpfn = held.unwrap_or(pfn);
    let kind = match k {
        0..=3 => NonPresent::Swap {
            ty: rng.below(3) as u32,
            offset: 1 + rng.below(1 << 20),
            exclusive: rng.chance(50),
        },
        4 => NonPresent::Migration {
            pfn: mpfn,
            kind: Migration::Read,
        },
        5 => NonPresent::Migration {
            pfn: mpfn,
            kind: Migration::ReadExclusive,
        },
        6 => NonPresent::Migration {
            pfn: mpfn,
            kind: Migration::Write,
        },
        7 => NonPresent::DevicePrivate {
            pfn,
            write: rng.chance(50),
        },
        8 => NonPresent::DeviceExclusive { pfn },
        9 => NonPresent::Hwpoison { pfn },
        _ => NonPresent::Marker(Markers::from_bits_truncate(1 + rng.below(7))),
    };
    let mut e = kind.encode::<X86Pte>();
    if !matches!(kind, NonPresent::Marker(_)) {
        if rng.chance(30) {
            e = X86Pte::swp_mk_soft_dirty(e);
        }
        if src.uffd_wp() && rng.chance(30) {
            e = X86Pte::swp_mk_uffd_wp(e);
        }
    }
    e
}

/// The VMA of a random scenario.
pub fn random_vmas(rng: &mut Rng) -> (Vma, Vma) {
    let mut flags = VmFlags::empty();
    match rng.below(4) {
        0 => flags |= VmFlags::SHARED | VmFlags::MAYWRITE | VmFlags::WRITE,
        1 => flags |= VmFlags::SHARED,
        2 => flags |= VmFlags::MAYWRITE | VmFlags::WRITE,
        _ => flags |= VmFlags::MAYWRITE,
    }
    if rng.chance(50) {
        flags |= VmFlags::SOFT_DIRTY_TRACKED;
    }
    if rng.chance(25) {
        flags |= VmFlags::UFFD_WP;
    }
    if flags.contains(VmFlags::SHARED) || rng.chance(30) {
        flags |= VmFlags::FILE;
    }
    let mut dst = flags;
    if rng.chance(50) {
        dst.remove(VmFlags::UFFD_WP);
    }
    (
        Vma::new(flags, X86Pte::USER_READONLY),
        Vma::new(dst, X86Pte::USER_READONLY),
    )
}

/// A random parent address space: folios of orders 0-9 tiling the frame store, runs of PTEs
/// mapping them from arbitrary offsets (so runs start mid-folio, cross folio boundaries, and
/// cross tables), mixed W/D/A/soft-dirty/uffd-wp/PROT_NONE, swap entries, special and
/// struct-page-less frames, pinned anon folios with mixed anon-exclusive pages.
pub fn random_world(rng: &mut Rng, tables: usize) -> World {
    let (src, dst) = random_vmas(rng);
    let frames = tables * PTRS_PER_TABLE + 1024;
    let mut w = World::new(tables, frames, src, dst);
    let shared = src.is_shared();
    let writable_ok = src.flags.contains(VmFlags::MAYWRITE);
    // Tile the store with folios.
    {
        let mut f = w.folios();
        let mut pfn = BASE_PFN;
        // The last 256 frames stay free for the children's copies of pinned pages.
        let end = BASE_PFN + frames as u64 - 256;
        while pfn < end {
            let mut order = match rng.below(10) {
                0..=3 => 0,
                4 => 1,
                5 => 2,
                6 => 4,
                7 => 3 + rng.below(3) as u8,
                _ => rng.below(10) as u8,
            };
            while order > 0 && (pfn % (1 << order) != 0 || pfn + (1 << order) > end) {
                order -= 1;
            }
            let anon = !shared && rng.chance(70);
            f.add_folio(pfn, order, anon).expect("tiling");
            if anon && rng.chance(15) {
                f.page_mut(pfn).unwrap().pinned = true;
            }
            pfn += 1 << order;
        }
        for i in 0..frames {
            let p = f.page_mut(BASE_PFN + i as u64).unwrap();
            p.data = rng.next();
            p.poisoned = rng.chance(1) && rng.chance(20);
        }
    }
    let pinned: Vec<u64> = (0..frames as u64)
        .map(|k| BASE_PFN + k)
        .filter(|&pfn| {
            let p = w.page(pfn);
            p.used && w.page(p.head).pinned
        })
        .collect();
    let n = w.parent.len();
    let mut i = 0;
    while i < n {
        match rng.below(20) {
            0..=3 => {
                // Hole.
                i += 1 + rng.below(40) as usize;
            }
            4 => {
                let pfn = BASE_PFN + rng.below(frames as u64 - 256);
                // A page under migration is held by the migration (here: by a pin's
                // references), so no zap frees it while its entries remain.
                let held =
                    (!pinned.is_empty()).then(|| pinned[rng.below(pinned.len() as u64) as usize]);
                let e = random_nonpresent(rng, pfn, held, src);
                w.map(i, e);
                i += 1;
            }
            5 => {
                // Special, or a frame without struct page.
                let e = if rng.chance(50) {
                    pte(BASE_PFN + rng.below(frames as u64), P | US | A | SPECIAL)
                } else {
                    pte(
                        NOPAGE_PFN + rng.below(64),
                        P | US | A | (RW * u64::from(writable_ok)),
                    )
                };
                w.map(i, e);
                i += 1;
            }
            _ => {
                let long = rng.chance(30);
                let len = 1 + rng.below(if long { 600 } else { 40 }) as usize;
                let start_pfn = BASE_PFN + rng.below(frames as u64 - 256);
                let mut flags = P | US | NX;
                if rng.chance(60) {
                    flags |= A;
                }
                if writable_ok && rng.chance(60) {
                    flags |= RW;
                }
                if rng.chance(40) {
                    flags |= D;
                }
                if rng.chance(30) {
                    flags |= SD;
                }
                if src.uffd_wp() && rng.chance(30) {
                    flags = (flags | UFFD) & !RW;
                }
                let noisy = rng.chance(40);
                for k in 0..len {
                    if i >= n || start_pfn + k as u64 >= BASE_PFN + frames as u64 - 256 {
                        break;
                    }
                    let mut fl = flags;
                    if noisy {
                        if rng.chance(10) {
                            fl ^= A;
                        }
                        if writable_ok && rng.chance(10) {
                            fl ^= RW;
                        }
                        if rng.chance(8) {
                            fl ^= D;
                        }
                        if rng.chance(8) {
                            fl ^= SD;
                        }
                        if src.uffd_wp() && rng.chance(5) {
                            fl = (fl ^ UFFD) & !RW;
                        }
                        if rng.chance(3) {
                            fl = (fl & !P) | G; // PROT_NONE
                        }
                    }
                    w.map(i, pte(start_pfn + k as u64, fl));
                    i += 1;
                }
            }
        }
    }
    w.restore = rng.chance(70);
    w.swap_full = if rng.chance(20) {
        rng.below(4) as u32
    } else {
        0
    };
    w.keep_markers = rng.chance(40);
    // Pins and anon-exclusive flags: exclusive only for pages mapped exactly once.
    {
        let mut f = w.folios();
        for k in 0..frames {
            let pfn = BASE_PFN + k as u64;
            let p = *f.page(pfn).unwrap();
            if !p.used {
                continue;
            }
            let head = *f.page(p.head).unwrap();
            if head.anon && p.mapcount == 1 && rng.chance(70) {
                f.page_mut(pfn).unwrap().anon_exclusive = true;
            }
            if p.head == pfn && head.pinned {
                f.page_mut(pfn).unwrap().refcount += PIN_BIAS;
            }
        }
    }
    w
}

/// Bits of a child entry that legitimately differ between batched and reference copies.
pub fn child_ignored(src: Vma) -> u64 {
    let mut m = 0;
    if src.is_shared() {
        m |= RW; // the batch maps the child writable if any entry was
    }
    if !src.soft_dirty_tracked() {
        m |= SD; // the batch takes the first entry's soft-dirty
    }
    m
}
