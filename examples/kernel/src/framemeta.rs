//! Per-frame metadata: a reference count, a map count and the folio order of every frame the
//! allocator manages, in one array the kernel owns (allocated at boot, sized to RAM).
//!
//! A *folio* is a naturally aligned block of 2^order frames from [`frames::alloc`]. Its head
//! (first frame) carries the folio's reference count; every frame carries its own map count
//! (how many user PTEs map it) and the folio's order, so the head of any frame is found by
//! alignment ([`folio_head`]). User memory is allocated with [`alloc_folio`] and released with
//! [`put_folio`], which frees the whole block when the last reference goes.

use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicUsize, Ordering};

use crate::frames::{self, FRAME_SIZE};

/// The metadata of one frame.
#[derive(Debug)]
pub struct FrameMeta {
    /// References to the folio (meaningful on the head frame): mappings plus kernel holds.
    pub refcount: AtomicU32,
    /// User PTEs mapping this frame.
    pub mapcount: AtomicU32,
    /// Order of the folio this frame belongs to.
    pub order: AtomicU32,
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
