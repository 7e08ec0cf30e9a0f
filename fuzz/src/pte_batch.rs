//! Harnesses of `oskit-pte-batch`.

use oskit_pte_batch::hal::{PAGE_SIZE, PTRS_PER_TABLE};
use std::cell::RefCell;

use oskit_pte_batch::sim::{ContSpace, OrderLog, Ordered, SimFolios, SimPage, SimSpace};
use oskit_pte_batch::{
    Arm64Pte, FolioOps, Fork, NonPresent, PageTable, PteFormat, Rss, VmFlags, Vma, X86Pte, Zap,
    reference,
};

const BASE: u64 = 0x7f00_0000_0000;
const BASE_PFN: u64 = 0x4000;
const TABLES: usize = 2;
const ENTRIES: usize = TABLES * PTRS_PER_TABLE;
/// Frames with a `struct page`; the last 64 stay free for copies of pinned pages.
const FRAMES: usize = 1024 + 64;
const PIN_BIAS: i64 = 1024;

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u64(&mut self) -> u64 {
        let mut v = 0;
        for i in 0..8 {
            v |= u64::from(self.u8()) << (8 * i);
        }
        v
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn addr(i: usize) -> u64 {
    BASE + i as u64 * PAGE_SIZE
}

/// Builds page metadata (folio layout, pins, exclusivity, poison) and entries from the bytes.
/// Entries are either arbitrary `u64`s or structured ones pointing into the frame store.
fn build<F: PteFormat>(
    b: &mut Bytes<'_>,
    pages: &mut [SimPage],
    entries: &mut [u64],
    structured_flags: u64,
) {
    let shared = b.u8() & 1 == 1;
    let mut f = SimFolios::new(BASE_PFN, pages);
    let mut pfn = BASE_PFN;
    while pfn < BASE_PFN + FRAMES as u64 - 64 {
        let x = b.u8();
        let mut order = x % 10;
        while order > 0
            && (!pfn.is_multiple_of(1 << order)
                || pfn + (1 << order) > BASE_PFN + FRAMES as u64 - 64)
        {
            order -= 1;
        }
        let anon = !shared && x & 0x10 != 0;
        f.add_folio(pfn, order, anon).expect("tiling");
        if anon && x & 0x60 == 0x60 {
            f.page_mut(pfn).unwrap().pinned = true;
        }
        if x == 0xff {
            f.page_mut(pfn).unwrap().poisoned = true;
        }
        pfn += 1 << order;
    }
    let mut i = 0;
    while i < entries.len() && !b.is_empty() {
        let mode = b.u8();
        match mode % 4 {
            0 => {
                entries[i] = b.u64();
                i += 1;
            }
            1 => i += 1 + usize::from(b.u8() % 64),
            3 if mode & 0x80 != 0 => {
                // A run of swap entries, consecutive slots of one device (what a swapped-out
                // large folio leaves; a zap frees it in runs), with occasional flag noise.
                let len = 1 + usize::from(b.u8() % 64);
                let ty = u32::from(b.u8() % 24);
                let slot = b.u64() & 0xff_ffff;
                let exclusive = b.u8() & 1 != 0;
                let noise = b.u8();
                for k in 0..len {
                    if i >= entries.len() {
                        break;
                    }
                    let offset = slot + k as u64;
                    let mut e = NonPresent::Swap {
                        ty,
                        offset,
                        exclusive,
                    }
                    .encode::<F>();
                    if noise != 0 && k % usize::from(noise) == usize::from(noise) - 1 {
                        e = if noise & 1 != 0 {
                            F::swp_mk_soft_dirty(e)
                        } else {
                            F::swp_mk_uffd_wp(e)
                        };
                    }
                    entries[i] = e;
                    i += 1;
                }
            }
            _ => {
                // A run of structured entries with occasional flag noise.
                let len = 1 + usize::from(b.u8());
                let start = BASE_PFN + u64::from(b.u8()) * 4 + u64::from(b.u8() % 4);
                let flags = structured_flags ^ (u64::from(b.u8()) << 1 & 0xfe);
                let noise = b.u8();
                for k in 0..len {
                    if i >= entries.len() {
                        break;
                    }
                    let mut fl = flags;
                    if noise != 0 && k % usize::from(noise) == usize::from(noise) - 1 {
                        fl ^= u64::from(noise) << 1 & 0xfe;
                    }
                    entries[i] = F::with_pfn(fl, start + k as u64);
                    i += 1;
                }
            }
        }
    }
    for e in entries.iter_mut() {
        if !F::is_none(*e) && !F::is_present(*e) {
            // A device entry holds a mapping of its page like a present one.
            if let NonPresent::DevicePrivate { pfn, .. } | NonPresent::DeviceExclusive { pfn } =
                NonPresent::decode::<F>(*e)
            {
                if f.folio(pfn).is_none() && f.page(pfn).is_some() {
                    *e = 0;
                } else {
                    f.account_mapping(pfn);
                }
            }
            continue;
        }
        if F::is_present(*e) && !F::is_special(*e) {
            // A table mapping a free frame is a corrupt kernel, outside any contract: the
            // frame may be handed out as a child's copy.
            if f.folio(F::pfn(*e)).is_none() && f.page(F::pfn(*e)).is_some() {
                *e = 0;
                continue;
            }
            f.account_mapping(F::pfn(*e));
        }
    }
    let excl = b.u8();
    for k in 0..FRAMES {
        let p = BASE_PFN + k as u64;
        let page = *f.page(p).unwrap();
        if !page.used {
            continue;
        }
        let head = *f.page(page.head).unwrap();
        if head.anon && page.mapcount == 1 && (k as u8 ^ excl) & 1 == 0 {
            f.page_mut(p).unwrap().anon_exclusive = true;
        }
        if page.head == p && head.pinned {
            f.page_mut(p).unwrap().refcount += PIN_BIAS;
        }
    }
}

fn vmas(x: u8) -> (Vma, Vma) {
    let mut flags = match x % 4 {
        0 => VmFlags::SHARED | VmFlags::MAYWRITE | VmFlags::WRITE,
        1 => VmFlags::SHARED,
        2 => VmFlags::MAYWRITE | VmFlags::WRITE,
        _ => VmFlags::MAYWRITE,
    };
    if x & 4 != 0 {
        flags |= VmFlags::SOFT_DIRTY_TRACKED;
    }
    if x & 8 != 0 {
        flags |= VmFlags::UFFD_WP;
    }
    let dst = if x & 16 != 0 {
        flags - VmFlags::UFFD_WP
    } else {
        flags
    };
    (
        Vma::new(flags, X86Pte::USER_READONLY),
        Vma::new(dst, X86Pte::USER_READONLY),
    )
}

fn no_leaks(pages: &[SimPage]) {
    for (i, p) in pages.iter().enumerate() {
        if p.used && p.head == BASE_PFN + i as u64 {
            assert_eq!(p.total_mapcount, 0, "mapped after full zap");
            assert_eq!(
                p.refcount,
                if p.pinned { PIN_BIAS } else { 0 },
                "references leaked at {i}"
            );
        }
    }
}

/// Arbitrary x86-64 tables and folio layouts: batched fork and zap never panic, keep
/// refcount >= mapcount, and agree with the per-PTE reference.
pub fn copy_zap(data: &[u8]) {
    let mut b = Bytes(data);
    let (src, dst) = vmas(b.u8());
    let range = (
        usize::from(b.u8()) * 4 % ENTRIES,
        ENTRIES - usize::from(b.u8()) * 4 % ENTRIES,
    );
    let (start, end) = (range.0.min(range.1), range.0.max(range.1));
    let mut pages = vec![SimPage::default(); FRAMES];
    let mut parent = vec![0u64; ENTRIES];
    let x86 = 0x8000_0000_0000_0005 | X86Pte::USER_READONLY;
    build::<X86Pte>(&mut b, &mut pages, &mut parent, x86);
    let original: Vec<bool> = pages.iter().map(|p| p.used).collect();

    let (mut p1, mut p2) = (parent.clone(), parent);
    let (mut c1, mut c2) = (vec![0u64; ENTRIES], vec![0u64; ENTRIES]);
    let mut pages2 = pages.clone();
    let (r1, rss1, r2, rss2);
    {
        let mut f1 = SimFolios::from_pages(BASE_PFN, &mut pages);
        let mut f2 = SimFolios::from_pages(BASE_PFN, &mut pages2);
        let (mut ps1, mut cs1) = (
            SimSpace::<X86Pte>::new(BASE, &mut p1),
            SimSpace::<X86Pte>::new(BASE, &mut c1),
        );
        let (mut ps2, mut cs2) = (
            SimSpace::<X86Pte>::new(BASE, &mut p2),
            SimSpace::<X86Pte>::new(BASE, &mut c2),
        );
        let mut fork = Fork::new(&mut f1, src, dst);
        r1 = fork.copy_range(&mut cs1, &mut ps1, addr(start), addr(end));
        rss1 = fork.rss();
        drop(fork);
        let mut rss = Rss::default();
        r2 = reference::copy_range(
            &mut cs2,
            &mut ps2,
            &mut f2,
            src,
            dst,
            addr(start),
            addr(end),
            &mut rss,
        );
        rss2 = rss;
        assert_eq!(
            f1.violations(),
            0,
            "batched copy broke refcount >= mapcount"
        );
        assert_eq!(
            f2.violations(),
            0,
            "reference copy broke refcount >= mapcount"
        );
    }
    assert_eq!(r1, r2, "copy result");
    if r1.is_ok() {
        assert_eq!(rss1, rss2, "copy rss");
        assert_eq!(p1, p2, "parent entries");
        let mut ignored = 0;
        if src.is_shared() {
            ignored |= 1 << 1;
        }
        if !src.soft_dirty_tracked() {
            ignored |= 1 << 11;
        }
        for i in 0..ENTRIES {
            let (x, y) = (c1[i], c2[i]);
            let fresh = |pfn: u64| {
                let k = pfn.wrapping_sub(BASE_PFN) as usize;
                k < FRAMES && !original[k]
            };
            if X86Pte::is_present(x) && X86Pte::pfn(x) != X86Pte::pfn(y) {
                assert!(
                    fresh(X86Pte::pfn(x)) && fresh(X86Pte::pfn(y)),
                    "child pfn at {i}"
                );
            } else {
                assert_eq!(x & !ignored, y & !ignored, "child entry {i}");
            }
        }
        for k in 0..FRAMES {
            if original[k] {
                let (x, y) = (&pages[k], &pages2[k]);
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
                    "page {k}"
                );
            }
        }
    }
    for (pages, parent, child) in [
        (&mut pages, &mut p1, &mut c1),
        (&mut pages2, &mut p2, &mut c2),
    ] {
        let mut f = SimFolios::from_pages(BASE_PFN, pages);
        for (t, vma) in [(child, dst), (parent, src)] {
            // Every rmap removal and reference drop after the flush covering its entry.
            let log = RefCell::new(OrderLog::new());
            let mut s = Ordered::new(SimSpace::<X86Pte>::new(BASE, t), &log);
            let mut of = Ordered::new(&mut f, &log);
            let mut zap = Zap::new(&mut of, vma);
            zap.zap_range(&mut s, addr(0), addr(ENTRIES)).expect("zap");
            let log = log.borrow();
            assert!(!log.overflowed());
            assert_eq!(
                log.violations(),
                0,
                "page released before its TLB flush: {:?}",
                log.first_violation()
            );
            assert!(s.inner().entries().iter().all(|&e| e == 0));
        }
        assert_eq!(f.violations(), 0, "zap broke refcount >= mapcount");
        no_leaks(f.pages());
    }
}

/// Arbitrary arm64 tables, stray contiguous bits included, on the contiguous-bit backend: fork
/// and zap never panic, keep refcount >= mapcount, and leave nothing behind.
pub fn contiguous(data: &[u8]) {
    let mut b = Bytes(data);
    let (src, dst) = vmas(b.u8());
    let (src, dst) = (
        Vma::new(src.flags, Arm64Pte::USER_READONLY),
        Vma::new(dst.flags, Arm64Pte::USER_READONLY),
    );
    let mut pages = vec![SimPage::default(); FRAMES];
    let mut parent = vec![0u64; ENTRIES];
    let flags =
        Arm64Pte::USER_READONLY | Arm64Pte::DBM | if b.u8() & 1 == 1 { Arm64Pte::CONT } else { 0 };
    build::<Arm64Pte>(&mut b, &mut pages, &mut parent, flags);
    let mut child = vec![0u64; ENTRIES];
    let mut f = SimFolios::from_pages(BASE_PFN, &mut pages);
    let mut p = ContSpace::new(BASE, &mut parent);
    let mut c = ContSpace::new(BASE, &mut child);
    let mut fork = Fork::new(&mut f, src, dst);
    let r = fork.copy_range(&mut c, &mut p, addr(0), addr(ENTRIES));
    drop(fork);
    let _ = r;
    assert_eq!(f.violations(), 0, "copy broke refcount >= mapcount");
    for (t, vma) in [(&mut c, dst), (&mut p, src)] {
        let mut zap = Zap::new(&mut f, vma);
        zap.zap_range(t, addr(0), addr(ENTRIES)).expect("zap");
        for i in 0..ENTRIES {
            assert_eq!(t.get(addr(i)), 0);
        }
    }
    assert_eq!(f.violations(), 0, "zap broke refcount >= mapcount");
    no_leaks(f.pages());
}
