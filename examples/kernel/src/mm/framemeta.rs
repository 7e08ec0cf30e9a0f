//! Per-frame metadata: a reference count, a map count and the folio order of every frame the
//! allocator manages, in one array the kernel owns (allocated at boot, sized to RAM).
//!
//! A *folio* is a naturally aligned block of 2^order frames from [`frames::alloc`]. Its head
//! (first frame) carries the folio's reference count; every frame carries its own map count
//! (how many user PTEs map it) and the folio's order, so the head of any frame is found by
//! alignment ([`folio_head`]). User memory is allocated with [`alloc_folio`] and released with
//! [`put_folio`], which frees the whole block when the last reference goes.
//!
//! [`Folios`] is the same metadata seen through `oskit-pte-batch`'s [`FolioOps`] (Linux's
//! `struct page` array), for the batched fork and teardown in [`crate::mm::vm`]. Every operation
//! through it checks the folio's reference count against the sum of its pages' map counts (a
//! reference count below it would free a mapped folio) and counts [`violations`]. The sum is
//! kept on the head ([`FrameMeta::folio_maps`], Linux's large mapcount) by every map and unmap
//! ([`map_page`], [`unmap_page`]), so the check costs the same for a 2 MiB folio as for a page:
//! it runs on every COW fault and batch, in ring 0, which a hypervisor may emulate instruction
//! by instruction (kvm_pvm does).

use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use oskit_pte_batch::{Error, Folio, FolioOps, MaybePinned, PageAlloc};

use crate::mm::frames::{self, FRAME_SIZE};

/// The metadata of one frame.
#[derive(Debug)]
pub struct FrameMeta {
    /// References to the folio (meaningful on the head frame): mappings plus kernel holds.
    pub refcount: AtomicU32,
    /// User PTEs mapping this frame.
    pub mapcount: AtomicU32,
    /// Order of the folio this frame belongs to.
    pub order: AtomicU32,
    /// The sum of the map counts of the folio's pages (meaningful on the head frame).
    pub folio_maps: AtomicU32,
}

static TABLE: AtomicPtr<FrameMeta> = AtomicPtr::new(core::ptr::null_mut());
static LEN: AtomicUsize = AtomicUsize::new(0);

/// Allocates and zeroes the table for every frame the allocator manages. Boot CPU, once,
/// after [`frames::init`].
pub fn init() {
    let len = frames::end_frame();
    let bytes = len * size_of::<FrameMeta>();
    let count = bytes.div_ceil(FRAME_SIZE as usize);
    let base = frames::alloc_contiguous(count).expect("no room for the frame metadata");
    // SAFETY: freshly allocated, identity-mapped frames; all-zero bytes are valid atomics.
    unsafe { core::ptr::write_bytes(base as *mut u8, 0, count * FRAME_SIZE as usize) };
    LEN.store(len, Ordering::Relaxed);
    TABLE.store(base as *mut FrameMeta, Ordering::Release);
}

/// The metadata of the frame holding `paddr`.
///
/// # Panics
/// If `paddr` is beyond the managed frames.
pub fn get(paddr: u64) -> &'static FrameMeta {
    let frame = (paddr / FRAME_SIZE) as usize;
    let len = LEN.load(Ordering::Relaxed);
    assert!(frame < len, "no metadata for frame {frame:#x}");
    // SAFETY: `init` set TABLE to `len` zero-initialised entries that live forever.
    unsafe { &*TABLE.load(Ordering::Acquire).add(frame) }
}

/// The metadata of the frame holding `paddr`, or `None` beyond the managed frames.
pub fn try_get(paddr: u64) -> Option<&'static FrameMeta> {
    let frame = usize::try_from(paddr / FRAME_SIZE).ok()?;
    (frame < LEN.load(Ordering::Relaxed)).then(|| get(paddr))
}

/// The head frame of the folio holding `paddr`.
pub fn folio_head(paddr: u64) -> u64 {
    let order = get(paddr).order.load(Ordering::Relaxed);
    paddr & !((FRAME_SIZE << order) - 1)
}

/// Allocates a folio of 2^`order` frames with one reference (the caller's) and no mappings.
pub fn alloc_folio(order: u32) -> Option<u64> {
    let head = frames::alloc(order)?;
    for i in 0..1u64 << order {
        let meta = get(head + i * FRAME_SIZE);
        meta.order.store(order, Ordering::Relaxed);
        meta.mapcount.store(0, Ordering::Relaxed);
        meta.folio_maps.store(0, Ordering::Relaxed);
        meta.refcount.store(u32::from(i == 0), Ordering::Relaxed);
    }
    Some(head)
}

/// Takes one more reference to the folio holding `paddr`.
pub fn get_folio(paddr: u64) {
    get(folio_head(paddr))
        .refcount
        .fetch_add(1, Ordering::Relaxed);
}

/// Drops a reference to the folio holding `paddr`; frees the folio when it was the last.
pub fn put_folio(paddr: u64) {
    let head = folio_head(paddr);
    let meta = get(head);
    let old = meta.refcount.fetch_sub(1, Ordering::AcqRel);
    assert!(old > 0, "folio {head:#x} put with no reference");
    if old == 1 {
        frames::free(head, meta.order.load(Ordering::Relaxed));
    }
}

/// References to the folio holding `paddr`.
pub fn refcount(paddr: u64) -> u32 {
    get(folio_head(paddr)).refcount.load(Ordering::Acquire)
}

/// One more user PTE maps the frame at `paddr`: its map count and its folio's total.
pub fn map_page(paddr: u64) {
    get(paddr).mapcount.fetch_add(1, Ordering::Relaxed);
    get(folio_head(paddr))
        .folio_maps
        .fetch_add(1, Ordering::Relaxed);
}

/// One user PTE less maps the frame at `paddr`. A count (the frame's, or its folio's total)
/// already at zero stays there and is a counted [`violations`].
pub fn unmap_page(paddr: u64) {
    for count in [&get(paddr).mapcount, &get(folio_head(paddr)).folio_maps] {
        if count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_err()
        {
            VIOLATIONS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Operations through [`Folios`] after which a folio's reference count was below the sum of
/// its pages' map counts (or a count would have gone below zero).
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);

/// How many metadata invariant violations [`Folios`] has seen since boot (0 in a sound kernel).
pub fn violations() -> u64 {
    VIOLATIONS.load(Ordering::Relaxed)
}

/// The folio's reference count compared with the sum of its pages' map counts: false (and a
/// counted violation) when the references are fewer than the mappings.
fn refs_cover_maps(head: u64) -> bool {
    let meta = get(head);
    let ok = meta.refcount.load(Ordering::Relaxed) >= meta.folio_maps.load(Ordering::Relaxed);
    if !ok {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
    ok
}

/// The kernel's frame metadata as `oskit-pte-batch` sees it: every frame the allocator manages
/// belongs to a folio (order from its metadata); everything is anonymous memory (the kernel
/// has no page cache); nothing is ever DMA-pinned, so an anon rmap duplication never fails.
/// Frames the crate must not count (a space's fixed mappings of kernel frames) carry
/// [`crate::mm::vm::PTE_FIXED`], the x86 `_PAGE_SPECIAL` bit, and never reach these methods.
///
/// Callers hold the lock that serialises changes to user page tables (`vm`'s space table), so
/// the counts seen here are stable between two operations.
#[derive(Debug, Default)]
pub struct Folios;

impl Folios {
    /// One more map of each of the `nr` pages from `pfn`.
    fn map_pages(pfn: u64, nr: usize) {
        for i in 0..nr as u64 {
            map_page((pfn + i) * FRAME_SIZE);
        }
    }

    /// One map less of each of the `nr` pages from `pfn` (a page with none is a violation).
    fn unmap_pages(pfn: u64, nr: usize) {
        for i in 0..nr as u64 {
            unmap_page((pfn + i) * FRAME_SIZE);
        }
    }
}

impl FolioOps for Folios {
    fn folio(&self, pfn: u64) -> Option<Folio> {
        let paddr = pfn.checked_mul(FRAME_SIZE)?;
        let order = try_get(paddr)?.order.load(Ordering::Relaxed);
        Some(Folio {
            pfn: folio_head(paddr) / FRAME_SIZE,
            nr_pages: 1 << order,
            anon: true,
        })
    }

    fn ref_add(&mut self, folio: &Folio, nr: usize) {
        let head = folio.pfn * FRAME_SIZE;
        get(head).refcount.fetch_add(nr as u32, Ordering::Relaxed);
        refs_cover_maps(head);
    }

    fn ref_sub(&mut self, folio: &Folio, nr: usize) {
        let head = folio.pfn * FRAME_SIZE;
        let meta = get(head);
        let old = meta.refcount.fetch_sub(nr as u32, Ordering::AcqRel);
        if old < nr as u32 {
            VIOLATIONS.fetch_add(1, Ordering::Relaxed);
            meta.refcount.store(0, Ordering::Relaxed);
            return; // never free a folio whose count went wrong: leak it, the check says so
        }
        if refs_cover_maps(head) && old == nr as u32 {
            frames::free(head, meta.order.load(Ordering::Relaxed));
        }
    }

    fn try_dup_anon_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize) -> Result<(), MaybePinned> {
        Self::map_pages(pfn, nr);
        refs_cover_maps(folio.pfn * FRAME_SIZE);
        Ok(())
    }

    fn dup_file_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize) {
        Self::map_pages(pfn, nr);
        refs_cover_maps(folio.pfn * FRAME_SIZE);
    }

    fn remove_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize) {
        Self::unmap_pages(pfn, nr);
        refs_cover_maps(folio.pfn * FRAME_SIZE);
    }

    fn add_new_anon_rmap(&mut self, pfn: u64) {
        // A page fresh from `alloc_page`: no map yet.
        map_page(pfn * FRAME_SIZE);
        refs_cover_maps(pfn * FRAME_SIZE);
    }

    fn mapcount(&self, pfn: u64) -> usize {
        try_get(pfn.saturating_mul(FRAME_SIZE))
            .map_or(0, |m| m.mapcount.load(Ordering::Relaxed) as usize)
    }

    fn is_anon_exclusive(&self, _pfn: u64) -> bool {
        // Exclusivity only matters for pinned pages, and nothing pins user memory here.
        false
    }
}

impl PageAlloc for Folios {
    fn alloc_page(&mut self) -> Option<u64> {
        alloc_folio(0).map(|paddr| paddr / FRAME_SIZE)
    }

    fn free_page(&mut self, pfn: u64) {
        put_folio(pfn * FRAME_SIZE);
    }

    fn copy_page(&mut self, dst: u64, src: u64) -> Result<(), Error> {
        // SAFETY: `dst` is a frame from `alloc_page`, `src` a mapped (so live) user frame; both
        // below 4 GiB and identity-mapped, and distinct.
        unsafe {
            core::ptr::copy_nonoverlapping(
                (src * FRAME_SIZE) as *const u8,
                (dst * FRAME_SIZE) as *mut u8,
                FRAME_SIZE as usize,
            )
        };
        Ok(())
    }
}
