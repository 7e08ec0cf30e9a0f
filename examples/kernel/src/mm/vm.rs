//! Address spaces and page tables.
//!
//! **The kernel half.** The boot code identity-maps the first 4 GiB with 2 MiB pages (PML4
//! entry 0). [`init`] splits the 2 MiB pages that hold the kernel image into 4 KiB pages and
//! makes the image's code and read-only data (`__kernel_start..__user_visible_end`) readable
//! and executable from ring 3, but never writable; `.data`, `.bss`, stacks, page tables and
//! all other RAM stay supervisor-only. So user tasks can run plain Rust functions compiled into
//! the kernel (as long as they touch no kernel statics: see [`crate::task::ulib`]), and a user write
//! (or read) of kernel data faults. This relies on SMEP/SMAP being off (they are never enabled
//! here): with SMEP, ring 0 could not execute its own user-visible code.
//!
//! **User address spaces.** Each has its own PML4 whose entry 0 points at the kernel's shared
//! PDPT, so the kernel half is the same in every space; user mappings live in PML4 entries
//! 1..256 (`USER_START..USER_END`). A space has a few regions: *anonymous* ones are filled on
//! first touch ([`handle_fault`]: demand paging); *fixed* ones map frames the kernel owns
//! (e.g. a buffer shared read-only with ring 3), which the space never frees.
//!
//! **Copy-on-write.** [`fork`] copies the user page tables with `oskit-pte-batch` on the real
//! tables ([`crate::mm::ptbatch`]): a run of PTEs mapping consecutive pages of one large folio is
//! one batch (one reference add, one map-count duplication, one write-protect of the parent's
//! range, one `set_ptes` into the child), and the parent's write-protected range is flushed
//! once per page table. Private writable regions are copy-on-write: both sides end up
//! read-only, and (as in Linux) a write fault on a present read-only page of a writable
//! anonymous region is a COW fault: it copies the frame, or just makes it writable again when
//! the folio's reference count says this mapping is its only user. Fixed regions are shared
//! mappings (the child maps the same kernel frames, unchanged). Teardown ([`destroy`]) zaps
//! each region with the crate's batched zap (one clear, one map-count drop and, after one TLB
//! flush, one reference drop per batch). References and map counts live in
//! [`crate::mm::framemeta`]; each space counts its resident folio pages ([`rss`]).
//!
//! **TLBs.** Only one task uses a space, and a CPU's scheduler loop always switches back to the
//! kernel page tables, so a space is loaded on at most one CPU, and only while its task runs
//! there; changes to it are flushed locally (`invlpg` or a CR3 reload).

use core::sync::atomic::{AtomicU64, Ordering};

use oskit_pte_batch::{Fork, PageTable, VmFlags, Vma, Zap};

use crate::{
    mm::framemeta,
    mm::frames::{self, FRAME_SIZE},
    mm::ptbatch,
    spin::SpinLock,
};

/// Present.
pub const PTE_P: u64 = 1 << 0;
/// Writable.
pub const PTE_W: u64 = 1 << 1;
/// User-accessible.
pub const PTE_U: u64 = 1 << 2;
/// Write-through.
const PTE_PWT: u64 = 1 << 3;
/// Cache disable.
const PTE_PCD: u64 = 1 << 4;
/// Large page (in a PD or PDPT entry).
const PTE_PS: u64 = 1 << 7;
/// Software bit 9: the frame is not the space's (never refcounted or freed by it). This is
/// the bit `oskit-pte-batch` reads as x86 `_PAGE_SPECIAL` ("no `struct page`"), so the crate
/// copies and zaps such entries without touching any folio. (Bits 10 and 11 are its uffd-wp
/// and soft-dirty bits: the kernel uses neither.)
pub const PTE_FIXED: u64 = 1 << 9;
/// No-execute (only set when EFER.NXE is on).
const PTE_NX: u64 = 1 << 63;
/// The physical-address bits of an entry.
pub const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// First user virtual address (PML4 entry 1).
pub const USER_START: u64 = 0x0000_0080_0000_0000;
/// End of the user range (the end of the lower canonical half).
pub const USER_END: u64 = 0x0000_8000_0000_0000;

/// The most address spaces alive at once.
pub const MAX_SPACES: usize = 32;
const MAX_REGIONS: usize = 16;

unsafe extern "C" {
    static boot_pml4: u8;
    static __kernel_start: u8;
    static __user_visible_end: u8;
}

static KERNEL_ROOT: AtomicU64 = AtomicU64::new(0);
static NX: AtomicU64 = AtomicU64::new(0);

/// Pages filled on first touch since boot.
pub static DEMAND_FAULTS: AtomicU64 = AtomicU64::new(0);
/// Copy-on-write faults that copied the frame.
pub static COW_COPIES: AtomicU64 = AtomicU64::new(0);
/// Copy-on-write faults that reused the frame (its only mapping).
pub static COW_REUSES: AtomicU64 = AtomicU64::new(0);
/// PTEs copied by [`fork`].
pub static PTES_COPIED: AtomicU64 = AtomicU64::new(0);
/// Batches [`fork`] copied them in (a batch of one for a single page).
pub static FORK_BATCHES: AtomicU64 = AtomicU64::new(0);
/// Parent TLB range flushes [`fork`] asked for (once per page table it write-protected in).
pub static FORK_TLB_FLUSHES: AtomicU64 = AtomicU64::new(0);
/// PTEs cleared by [`destroy`].
pub static ZAP_PTES: AtomicU64 = AtomicU64::new(0);
/// Batches [`destroy`] cleared them in.
pub static ZAP_BATCHES: AtomicU64 = AtomicU64::new(0);
/// TLB range flushes (each followed by the gathered reference drops) of [`destroy`].
pub static ZAP_TLB_FLUSHES: AtomicU64 = AtomicU64::new(0);
/// Spaces destroyed with a resident-page count that the zap did not bring back to zero.
pub static RSS_MISMATCHES: AtomicU64 = AtomicU64::new(0);

/// A user address space (an index into the kernel's table of spaces).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceId(usize);

/// Why a mapping request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmError {
    /// Out of frames, region slots or space slots.
    NoMemory,
    /// The range is outside the user range, unaligned, or overlaps a region.
    BadRange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Anonymous,
    Fixed,
}

#[derive(Debug, Clone, Copy)]
struct Region {
    start: u64,
    end: u64,
    writable: bool,
    kind: Kind,
}

impl Region {
    /// The region as the crate's VMA: an anonymous writable region is a private writable
    /// mapping (copy-on-write at fork); a fixed one is a shared mapping of kernel frames.
    fn vma(&self) -> Vma {
        let mut flags = VmFlags::empty();
        if self.writable {
            flags |= VmFlags::WRITE | VmFlags::MAYWRITE;
        }
        if self.kind == Kind::Fixed {
            flags |= VmFlags::SHARED;
        }
        Vma::new(flags, PTE_P | PTE_U | NX.load(Ordering::Relaxed))
    }
}

/// What [`fork`] did for one region of the child it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegionCopy {
    /// The region.
    pub start: u64,
    /// Its end.
    pub end: u64,
    /// PTEs copied.
    pub ptes: u64,
    /// Batches they were copied in.
    pub batches: u64,
    /// Parent TLB range flushes asked for.
    pub tlb_flushes: u64,
}

#[derive(Clone, Copy)]
struct Space {
    /// PML4 physical address; 0 when the slot is free.
    root: u64,
    regions: [Option<Region>; MAX_REGIONS],
    /// Folio pages mapped (anonymous RSS; fixed pages are not the space's).
    rss: i64,
    /// The space this one was forked from (slot), and what that copy did per region.
    forked_from: Option<usize>,
    copied: [Option<RegionCopy>; MAX_REGIONS],
}

const NO_SPACE: Space = Space {
    root: 0,
    regions: [None; MAX_REGIONS],
    rss: 0,
    forked_from: None,
    copied: [None; MAX_REGIONS],
};

static SPACES: SpinLock<[Space; MAX_SPACES]> = SpinLock::new([NO_SPACE; MAX_SPACES]);

/// The 512 entries of the page table at physical address `paddr`.
///
/// # Safety
/// `paddr` is a page table (identity-mapped) that the caller may access exclusively: the
/// kernel's tables during `init`, a space's tables under the `SPACES` lock.
#[allow(clippy::mut_from_ref)]
unsafe fn table(paddr: u64) -> &'static mut [u64; 512] {
    // SAFETY: by the contract.
    unsafe { &mut *((paddr & PTE_ADDR) as *mut [u64; 512]) }
}

fn zeroed_frame() -> Option<u64> {
    let paddr = frames::alloc(0)?;
    // SAFETY: a frame we just allocated, identity-mapped.
    unsafe { core::ptr::write_bytes(paddr as *mut u8, 0, FRAME_SIZE as usize) };
    Some(paddr)
}

fn read_cr3() -> u64 {
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    cr3
}

fn write_cr3(root: u64) {
    // SAFETY: `root` is the kernel PML4 or a space's PML4, both of which map the kernel half.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) root, options(nostack)) };
}

fn invlpg(vaddr: u64) {
    // SAFETY: dropping a TLB entry is always safe.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) vaddr, options(nostack)) };
}

/// The kernel's PML4 (physical address).
pub fn kernel_root() -> u64 {
    KERNEL_ROOT.load(Ordering::Relaxed)
}

/// Splits the kernel image's identity pages into 4 KiB pages, exposes code and read-only data
/// to ring 3 read-only, and maps the local APIC uncached. Boot CPU, once, after the frame
/// allocator, before any other CPU starts.
pub fn init() {
    let root = &raw const boot_pml4 as u64;
    KERNEL_ROOT.store(root, Ordering::Relaxed);
    // SAFETY: reading EFER has no side effects.
    let efer = unsafe { x86::msr::rdmsr(0xc000_0080) };
    if efer & (1 << 11) != 0 {
        NX.store(PTE_NX, Ordering::Relaxed);
    }
    let visible = (&raw const __kernel_start as u64)..(&raw const __user_visible_end as u64);
    const HUGE: u64 = 2 << 20;
    // SAFETY: the boot page tables, before any other CPU or task uses them.
    unsafe {
        let pml4 = table(root);
        let pdpt = table(pml4[0]);
        let mut base = visible.start & !(HUGE - 1);
        while base < visible.end {
            let pd = table(pdpt[(base >> 30) as usize]);
            let pt_paddr = zeroed_frame().expect("no frame for the kernel page table");
            let pt = table(pt_paddr);
            for (i, pte) in pt.iter_mut().enumerate() {
                let paddr = base + i as u64 * FRAME_SIZE;
                *pte = paddr
                    | PTE_P
                    | if visible.contains(&paddr) {
                        PTE_U
                    } else {
                        PTE_W
                    };
            }
            pd[((base >> 21) & 511) as usize] = pt_paddr | PTE_P | PTE_W | PTE_U;
            pdpt[(base >> 30) as usize] |= PTE_U;
            base += HUGE;
        }
        pml4[0] |= PTE_U;
        let apic = 0xfee0_0000u64;
        let pd = table(pdpt[(apic >> 30) as usize]);
        let entry = &mut pd[((apic >> 21) & 511) as usize];
        debug_assert!(*entry & PTE_PS != 0);
        *entry |= PTE_PCD | PTE_PWT;
    }
    write_cr3(root);
}

/// Serialises changes to the kernel half made after boot.
static KERNEL_MAP: SpinLock<()> = SpinLock::new(());

/// Maps `[paddr, paddr + len)` at `vaddr` in the kernel half, supervisor-only and writable.
/// `vaddr` must lie in PML4 entry 0 outside the identity-mapped 4 GiB and be unmapped: the
/// new tables hang off the PDPT every address space shares, so no CPU can hold a stale entry.
pub fn map_kernel(vaddr: u64, paddr: u64, len: u64) -> Result<(), VmError> {
    if vaddr < 4 << 30 || vaddr.saturating_add(len) > 512 << 30 {
        return Err(VmError::BadRange);
    }
    let _guard = KERNEL_MAP.lock();
    for off in (0..len).step_by(FRAME_SIZE as usize) {
        // SAFETY: the kernel's tables, changed only here (under KERNEL_MAP) and in `init`.
        let pte =
            unsafe { walk_with(kernel_root(), vaddr + off, true, 0) }.ok_or(VmError::NoMemory)?;
        *pte = (paddr + off) | PTE_P | PTE_W | NX.load(Ordering::Relaxed);
    }
    Ok(())
}

/// Loads `space`'s page tables on this CPU.
pub fn activate(space: SpaceId) {
    let root = SPACES.lock()[space.0].root;
    assert!(root != 0, "activating a destroyed address space");
    if read_cr3() & PTE_ADDR != root {
        write_cr3(root);
    }
}

/// Loads the kernel's page tables on this CPU (if another space is loaded).
pub fn activate_kernel() {
    if read_cr3() & PTE_ADDR != kernel_root() {
        write_cr3(kernel_root());
    }
}

/// A new, empty user address space.
pub fn create() -> Result<SpaceId, VmError> {
    let mut spaces = SPACES.lock();
    let slot = spaces
        .iter()
        .position(|s| s.root == 0)
        .ok_or(VmError::NoMemory)?;
    let root = zeroed_frame().ok_or(VmError::NoMemory)?;
    // SAFETY: the kernel PML4's entry 0 never changes after `init`; the new PML4 is ours.
    unsafe { table(root)[0] = table(kernel_root())[0] };
    spaces[slot] = Space { root, ..NO_SPACE };
    Ok(SpaceId(slot))
}

/// The physical address of `space`'s PML4 (for code that walks or edits its tables, which must
/// hold no other mapping of them and flush what it changes).
pub fn root(space: SpaceId) -> u64 {
    SPACES.lock()[space.0].root
}

fn add_region(space: &mut Space, region: Region) -> Result<(), VmError> {
    let aligned = region.start.is_multiple_of(FRAME_SIZE) && region.end.is_multiple_of(FRAME_SIZE);
    if !aligned || region.start >= region.end || region.start < USER_START || region.end > USER_END
    {
        return Err(VmError::BadRange);
    }
    if space
        .regions
        .iter()
        .flatten()
        .any(|r| r.start < region.end && region.start < r.end)
    {
        return Err(VmError::BadRange);
    }
    let free = space
        .regions
        .iter_mut()
        .find(|r| r.is_none())
        .ok_or(VmError::NoMemory)?;
    *free = Some(region);
    Ok(())
}

/// Adds an anonymous region `[start, start + len)`, filled with zeroes on first touch.
pub fn map_anonymous(space: SpaceId, start: u64, len: u64, writable: bool) -> Result<(), VmError> {
    let mut spaces = SPACES.lock();
    add_region(
        &mut spaces[space.0],
        Region {
            start,
            end: start.saturating_add(len),
            writable,
            kind: Kind::Anonymous,
        },
    )
}

/// Maps the kernel's frames `[paddr, paddr + len)` at `start` now, user-readable (and writable
/// if asked). The space never frees them: the kernel must keep them alive until the space is
/// destroyed.
pub fn map_fixed(
    space: SpaceId,
    start: u64,
    paddr: u64,
    len: u64,
    writable: bool,
) -> Result<(), VmError> {
    let mut spaces = SPACES.lock();
    let s = &mut spaces[space.0];
    add_region(
        s,
        Region {
            start,
            end: start.saturating_add(len),
            writable,
            kind: Kind::Fixed,
        },
    )?;
    for off in (0..len).step_by(FRAME_SIZE as usize) {
        // SAFETY: the SPACES lock is held and `s.root` is this space's PML4.
        let pte = unsafe { walk(s.root, start + off, true) }.ok_or(VmError::NoMemory)?;
        *pte = (paddr + off)
            | PTE_P
            | PTE_U
            | PTE_FIXED
            | NX.load(Ordering::Relaxed)
            | if writable { PTE_W } else { 0 };
    }
    Ok(())
}

/// Maps the folio of 2^`order` frames at `head` (from [`framemeta::alloc_folio`]) at `start`
/// as a private region of the space, every page present now. The caller's folio reference
/// goes to the space, which takes one reference per mapped page (the convention throughout:
/// a folio's reference count is the number of PTEs mapping any of its pages, plus kernel
/// holds); the pages are then copied on write after a fork and freed with the last mapping.
/// On error the caller still owns its reference (pages already mapped keep their own, which
/// the space's teardown drops).
pub fn map_folio(
    space: SpaceId,
    start: u64,
    head: u64,
    order: u32,
    writable: bool,
) -> Result<(), VmError> {
    let pages = 1u64 << order;
    let mut spaces = SPACES.lock();
    let s = &mut spaces[space.0];
    add_region(
        s,
        Region {
            start,
            end: start.saturating_add(pages * FRAME_SIZE),
            writable,
            kind: Kind::Anonymous,
        },
    )?;
    map_pages(s, start, head, pages, writable)
}

/// Maps the folio of 2^`order` frames at `head` at `start` inside an existing anonymous region
/// of the space (from [`map_anonymous`]; `[start, start + 2^order pages)` must lie in it and be
/// unmapped), every page present now, with the region's writability. References as in
/// [`map_folio`]: the caller's goes to the space, which takes one per mapped page; on error the
/// caller still owns its reference. For spaces of more folios than a space has regions.
pub fn map_folio_into(space: SpaceId, start: u64, head: u64, order: u32) -> Result<(), VmError> {
    let pages = 1u64 << order;
    let end = start.saturating_add(pages * FRAME_SIZE);
    let mut spaces = SPACES.lock();
    let s = &mut spaces[space.0];
    let Some(region) = s.regions.iter().flatten().find(|r| {
        r.kind == Kind::Anonymous
            && r.start <= start
            && end <= r.end
            && start.is_multiple_of(FRAME_SIZE)
    }) else {
        return Err(VmError::BadRange);
    };
    let writable = region.writable;
    for i in 0..pages {
        // SAFETY: the SPACES lock is held and `s.root` is this space's PML4.
        let pte = unsafe { walk(s.root, start + i * FRAME_SIZE, false) };
        if pte.is_some_and(|p| *p & PTE_P != 0) {
            return Err(VmError::BadRange);
        }
    }
    map_pages(s, start, head, pages, writable)
}

/// Maps the `pages` frames from `head` at `start` in `s` (SPACES lock held): page 0 takes the
/// caller's folio reference, every other page one of its own; each frame's mapcount is 1. On
/// `NoMemory` (a page table could not be allocated) the caller gets its reference back.
fn map_pages(
    s: &mut Space,
    start: u64,
    head: u64,
    pages: u64,
    writable: bool,
) -> Result<(), VmError> {
    for i in 0..pages {
        // SAFETY: the SPACES lock is held and `s.root` is this space's PML4.
        let Some(pte) = (unsafe { walk(s.root, start + i * FRAME_SIZE, true) }) else {
            if i > 0 {
                // Page 0 took the caller's reference: give the caller one back.
                framemeta::get_folio(head);
            }
            return Err(VmError::NoMemory);
        };
        let frame = head + i * FRAME_SIZE;
        if i > 0 {
            framemeta::get_folio(frame);
        }
        framemeta::map_page(frame);
        *pte =
            frame | PTE_P | PTE_U | NX.load(Ordering::Relaxed) | if writable { PTE_W } else { 0 };
        s.rss += 1;
    }
    Ok(())
}

/// The PTE for `vaddr` in the tables under `root`, creating missing (user) tables if `create`.
///
/// # Safety
/// The caller holds the SPACES lock and `root` is a live space's PML4.
unsafe fn walk(root: u64, vaddr: u64, create: bool) -> Option<&'static mut u64> {
    // SAFETY: by the contract.
    unsafe { walk_with(root, vaddr, create, PTE_U) }
}

/// [`walk`], creating tables with `PTE_P | PTE_W | extra`.
///
/// # Safety
/// As [`walk`] (or: the kernel's tables, by their single writer).
unsafe fn walk_with(root: u64, vaddr: u64, create: bool, extra: u64) -> Option<&'static mut u64> {
    let mut tbl = root;
    for shift in [39, 30, 21] {
        // SAFETY: by the contract, every table reached from `root` is this space's.
        let entry = &mut unsafe { table(tbl) }[((vaddr >> shift) & 511) as usize];
        if *entry & PTE_P == 0 {
            if !create {
                return None;
            }
            *entry = zeroed_frame()? | PTE_P | PTE_W | extra;
        }
        tbl = *entry & PTE_ADDR;
    }
    // SAFETY: as above; `tbl` is now the page table.
    Some(&mut unsafe { table(tbl) }[((vaddr >> 12) & 511) as usize])
}

/// Resolves a page fault at `vaddr` with error code `error` in `space`: demand paging of an
/// anonymous region or copy-on-write (a write to a present, read-only, owned page of a
/// writable anonymous region). Returns false when the access is not allowed (the caller
/// then kills the task, or reports a kernel bug). The space must be the one loaded here.
pub fn handle_fault(space: SpaceId, vaddr: u64, error: u64) -> bool {
    const ERR_PRESENT: u64 = 1 << 0;
    const ERR_WRITE: u64 = 1 << 1;
    const ERR_FETCH: u64 = 1 << 4;
    let page = vaddr & !(FRAME_SIZE - 1);
    let mut spaces = SPACES.lock();
    let s = &mut spaces[space.0];
    let Some(region) = s
        .regions
        .iter()
        .flatten()
        .find(|r| (r.start..r.end).contains(&vaddr))
    else {
        return false;
    };
    if error & ERR_FETCH != 0 || (error & ERR_WRITE != 0 && !region.writable) {
        return false;
    }
    // SAFETY: the SPACES lock is held and `s.root` is this space's PML4.
    let Some(pte) = (unsafe { walk(s.root, page, error & ERR_PRESENT == 0) }) else {
        return false;
    };
    if *pte & PTE_P == 0 {
        if region.kind != Kind::Anonymous {
            return false;
        }
        let Some(frame) = framemeta::alloc_folio(0) else {
            return false;
        };
        // SAFETY: a frame we just allocated, identity-mapped.
        unsafe { core::ptr::write_bytes(frame as *mut u8, 0, FRAME_SIZE as usize) };
        framemeta::map_page(frame);
        *pte = frame
            | PTE_P
            | PTE_U
            | NX.load(Ordering::Relaxed)
            | if region.writable { PTE_W } else { 0 };
        s.rss += 1;
        DEMAND_FAULTS.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    let cow =
        error & ERR_WRITE != 0 && region.kind == Kind::Anonymous && *pte & (PTE_W | PTE_FIXED) == 0;
    if !cow {
        return false;
    }
    let old = *pte & PTE_ADDR;
    let flags = (*pte & !PTE_ADDR) | PTE_W;
    let refs = framemeta::refcount(old);
    let order = framemeta::get(old).order.load(Ordering::Relaxed);
    // One event per folio broken (its first page), not per page: the trace is shared.
    let traced = framemeta::folio_head(old) == old && !ptbatch::quiet();
    if refs == 1 {
        *pte = old | flags;
        COW_REUSES.fetch_add(1, Ordering::Relaxed);
        if traced {
            crate::trace!(
                "fork",
                "COW reuse {page:#x}: last reference to order-{order} folio {old:#x}"
            );
        }
    } else {
        let Some(new) = framemeta::alloc_folio(0) else {
            return false;
        };
        // SAFETY: `old` is mapped by this space (so alive), `new` is ours; both identity-mapped.
        unsafe {
            core::ptr::copy_nonoverlapping(old as *const u8, new as *mut u8, FRAME_SIZE as usize)
        };
        framemeta::map_page(new);
        framemeta::unmap_page(old);
        *pte = new | flags;
        framemeta::put_folio(old);
        COW_COPIES.fetch_add(1, Ordering::Relaxed);
        if traced {
            crate::trace!(
                "fork",
                "COW copy {page:#x}: page {old:#x} of order-{order} folio ({refs} refs) -> {new:#x}"
            );
        }
    }
    invlpg(page);
    true
}

/// A copy of `parent` for fork, made with `oskit-pte-batch` on the real page tables: same
/// regions; private writable pages shared copy-on-write (read-only in both), fixed pages
/// shared as they are. The crate flushes the parent's write-protected ranges from this CPU's
/// TLB (it must be the space loaded here, or not loaded at all).
pub fn fork(parent: SpaceId) -> Result<SpaceId, VmError> {
    let child = create()?;
    let mut spaces = SPACES.lock();
    let (p, c) = (spaces[parent.0], spaces[child.0]);
    // SAFETY: the SPACES lock is held, so nobody else changes either space's tables; the
    // parent is loaded on this CPU at most (its task is the caller), the child nowhere.
    let (mut src, mut dst) =
        unsafe { (ptbatch::space_tables(p.root), ptbatch::child_tables(c.root)) };
    let mut folios = framemeta::Folios;
    let mut copied = [None; MAX_REGIONS];
    let mut rss = 0;
    let mut result = Ok(());
    for (slot, region) in p.regions.iter().enumerate() {
        let Some(region) = region else { continue };
        let vma = region.vma();
        let mut fork = Fork::new(&mut folios, vma, vma);
        let done = fork.copy_range(&mut dst, &mut src, region.start, region.end);
        let stats = fork.stats();
        rss += fork.rss().anon + fork.rss().file;
        drop(fork);
        PTES_COPIED.fetch_add(stats.present, Ordering::Relaxed);
        FORK_BATCHES.fetch_add(stats.batches, Ordering::Relaxed);
        FORK_TLB_FLUSHES.fetch_add(stats.tlb_flushes, Ordering::Relaxed);
        copied[slot] = Some(RegionCopy {
            start: region.start,
            end: region.end,
            ptes: stats.present,
            batches: stats.batches,
            tlb_flushes: stats.tlb_flushes,
        });
        if stats.present > 0 {
            crate::trace!(
                "fork",
                "copied {:#x}..{:#x}: {} PTEs in {} batches, {} parent TLB flushes",
                region.start,
                region.end,
                stats.present,
                stats.batches,
                stats.tlb_flushes
            );
        }
        if done.is_err() {
            result = Err(VmError::NoMemory);
            break;
        }
    }
    let c = &mut spaces[child.0];
    c.regions = p.regions;
    c.rss = rss;
    c.forked_from = Some(parent.0);
    c.copied = copied;
    drop(spaces);
    match result {
        Ok(()) => Ok(child),
        Err(e) => {
            destroy(child);
            Err(e)
        }
    }
}

/// Frees the tables under `tbl` (at `level`: 3 = PDPT, 2 = PD, 1 = page table), which the zap
/// has emptied.
///
/// # Safety
/// The SPACES lock is held and `tbl` belongs to a space being destroyed.
unsafe fn free_level(tbl: u64, level: u32) {
    // SAFETY: by the contract.
    let t = unsafe { table(tbl) };
    if level == 1 {
        assert!(
            t.iter().all(|&e| e == 0),
            "a user page table at {tbl:#x} still maps a page outside every region at teardown"
        );
    } else {
        for &entry in t.iter().filter(|e| *e & PTE_P != 0) {
            // SAFETY: one level down, same space.
            unsafe { free_level(entry & PTE_ADDR, level - 1) };
        }
    }
    frames::free(tbl & PTE_ADDR, 0);
}

/// Destroys `space`: zaps every region with `oskit-pte-batch`'s batched zap (folio pages drop
/// their map counts and, after the TLB flush, their references: a folio is freed with its
/// last one; fixed pages are only unmapped), then frees its tables. It must not be loaded on
/// any CPU.
pub fn destroy(space: SpaceId) {
    let mut spaces = SPACES.lock();
    let s = spaces[space.0];
    assert!(s.root != 0, "destroying a free address space");
    assert!(
        read_cr3() & PTE_ADDR != s.root,
        "destroying the loaded space"
    );
    // SAFETY: the SPACES lock is held; the space is loaded nowhere and is ours to tear down.
    let mut tables = unsafe { ptbatch::space_tables(s.root) };
    let mut folios = framemeta::Folios;
    let mut rss = s.rss;
    for region in s.regions.iter().flatten() {
        let mut zap = Zap::new(&mut folios, region.vma());
        let done = zap.zap_range(&mut tables, region.start, region.end);
        assert!(done.is_ok(), "zap of region {region:?}: {done:?}");
        let stats = zap.stats();
        rss += zap.rss().anon + zap.rss().file;
        ZAP_PTES.fetch_add(stats.present, Ordering::Relaxed);
        ZAP_BATCHES.fetch_add(stats.batches, Ordering::Relaxed);
        ZAP_TLB_FLUSHES.fetch_add(stats.tlb_flushes, Ordering::Relaxed);
    }
    if rss != 0 {
        RSS_MISMATCHES.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: as above.
    let pml4 = unsafe { table(s.root) };
    for &entry in &pml4[1..256] {
        if entry & PTE_P != 0 {
            // SAFETY: as above.
            unsafe { free_level(entry & PTE_ADDR, 3) };
        }
    }
    frames::free(s.root, 0);
    spaces[space.0] = NO_SPACE;
    // Its children no longer have a parent here (the slot may be reused).
    for other in spaces.iter_mut() {
        if other.forked_from == Some(space.0) {
            other.forked_from = None;
        }
    }
}

/// The space's resident folio pages, as it accounts them (map, demand fault, fork, zap).
pub fn rss(space: SpaceId) -> i64 {
    SPACES.lock()[space.0].rss
}

/// The owned (non-fixed) present pages actually mapped in `space`'s regions, counted from its
/// page tables: what [`rss`] must equal.
pub fn resident_pages(space: SpaceId) -> u64 {
    let spaces = SPACES.lock();
    let s = &spaces[space.0];
    // SAFETY: the SPACES lock is held; nothing is changed through these tables.
    let tables = unsafe { ptbatch::space_tables(s.root) };
    let mut pages = 0;
    for region in s.regions.iter().flatten() {
        let mut addr = region.start;
        while addr < region.end {
            if !tables.has_table(addr) {
                addr = (addr | ((512 * FRAME_SIZE) - 1)) + 1;
                continue;
            }
            let pte = tables.get(addr);
            pages += u64::from(pte & PTE_P != 0 && pte & PTE_FIXED == 0);
            addr += FRAME_SIZE;
        }
    }
    pages
}

/// The entry mapping `vaddr` in `space` (0 if there is no page table for it).
pub fn pte(space: SpaceId, vaddr: u64) -> u64 {
    let spaces = SPACES.lock();
    // SAFETY: the SPACES lock is held; nothing is changed through these tables.
    unsafe { ptbatch::space_tables(spaces[space.0].root) }.get(vaddr & !(FRAME_SIZE - 1))
}

/// The one live space forked from `parent`, and what the fork copied per region; `None` if
/// there is none, or more than one.
pub fn forked_child(parent: SpaceId) -> Option<(SpaceId, [Option<RegionCopy>; MAX_REGIONS])> {
    let spaces = SPACES.lock();
    let mut children = spaces
        .iter()
        .enumerate()
        .filter(|(_, s)| s.root != 0 && s.forked_from == Some(parent.0));
    let (slot, child) = children.next()?;
    children
        .next()
        .is_none()
        .then_some((SpaceId(slot), child.copied))
}

/// Whether ring 3 of `space` may access `[addr, addr + len)` (write access if `write`): inside
/// its regions, or (read only) the kernel's user-visible code and read-only data.
pub fn user_range_ok(space: SpaceId, addr: u64, len: u64, write: bool) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let visible = (&raw const __kernel_start as u64)..(&raw const __user_visible_end as u64);
    if !write && visible.start <= addr && end <= visible.end {
        return true;
    }
    SPACES.lock()[space.0]
        .regions
        .iter()
        .flatten()
        .any(|r| r.start <= addr && end <= r.end && (r.writable || !write))
}
