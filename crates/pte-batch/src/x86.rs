//! Real x86-64 backend: walks a live 4-level x86-64 page-table hierarchy through a
//! physical-memory window, allocates the child's tables, updates entries atomically (the MMU
//! sets accessed/dirty concurrently), and invalidates the TLB with `INVLPG` / a CR3 reload.
//!
//! A kernel forking a user address space builds one [`X86PageTables`] for the parent (its PML4)
//! and one for the child (a fresh, zeroed PML4 whose kernel half it has already filled), then
//! calls [`Fork::copy_range`](crate::Fork::copy_range) for each VMA.

use core::cell::Cell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::Error;
use crate::format::{X86Flags, X86Pte};
use crate::hal::{PAGE_SIZE, PTRS_PER_TABLE, PageTable, PteFormat};

/// Physical address bits of an upper-level entry (a table's frame).
const ADDR_MASK: u64 = X86Pte::PFN_MASK;
/// PS: the entry maps a huge page rather than a table (PDPT and PD levels).
const HUGE: u64 = 1 << 7;
/// What an upper-level entry pointing to a new table carries: the leaf decides permissions.
const TABLE_FLAGS: u64 = X86Flags::PRESENT.bits() | X86Flags::RW.bits() | X86Flags::USER.bits();

/// The bits the MMU sets on its own (with a locked read-modify-write of a present entry).
const HW_BITS: u64 = X86Flags::ACCESSED.bits() | X86Flags::DIRTY.bits();

/// Replaces `slot`'s value `old` (just loaded) by `new`, keeping any accessed/dirty bit the MMU
/// sets meanwhile. Only the MMU writes an entry concurrently (software holds the page-table
/// lock), and it only ever sets accessed and dirty: when `old` has both, it has nothing left to
/// write, so a plain store loses nothing; otherwise the update is a locked `fetch_and` of the
/// cleared bits (`new` must be `old` with bits cleared).
#[inline(always)]
fn write_keeping_hw_bits(slot: &AtomicU64, old: u64, new: u64) {
    if old & HW_BITS == HW_BITS {
        slot.store(new, Ordering::Relaxed);
    } else {
        slot.fetch_and(new | HW_BITS, Ordering::Relaxed);
    }
}

/// Clears `slot` and returns its last value with every accessed/dirty bit the MMU set (a plain
/// load and store when the entry already has both, an atomic exchange otherwise).
#[inline(always)]
fn take(slot: &AtomicU64) -> u64 {
    let v = slot.load(Ordering::Relaxed);
    if v & HW_BITS == HW_BITS || v & X86Flags::PRESENT.bits() == 0 {
        // Nothing the MMU would set (or a non-present entry, which it never writes).
        slot.store(0, Ordering::Relaxed);
        v
    } else {
        slot.swap(0, Ordering::Relaxed)
    }
}

/// Access to page-table frames by physical address.
///
/// # Safety
/// For every 4 KiB-aligned `phys` for which [`table`](Self::table) returns `Some(p)`, `p` must be
/// valid for atomic reads and writes of 512 `u64`s for as long as the window is used, and the
/// same frame must always give the same pointer.
pub unsafe trait PhysWindow {
    /// A pointer to the frame at `phys`, or `None` if the window does not cover it.
    fn table(&self, phys: u64) -> Option<NonNull<u64>>;
}

/// The kernel's direct map: physical memory `[0, limit)` mapped at `offset`.
#[derive(Debug, Clone, Copy)]
pub struct DirectMap {
    offset: u64,
    limit: u64,
}

impl DirectMap {
    /// A window seeing physical address `p < limit` at virtual address `offset + p`.
    ///
    /// # Safety
    /// `[offset, offset + limit)` must be mapped read/write to physical `[0, limit)` for as long
    /// as the window is used.
    pub const unsafe fn new(offset: u64, limit: u64) -> Self {
        Self { offset, limit }
    }
}

// SAFETY: `new`'s contract: every covered frame is mapped at `offset + phys`; frames at or past
// `limit` (and misaligned addresses) are refused.
unsafe impl PhysWindow for DirectMap {
    fn table(&self, phys: u64) -> Option<NonNull<u64>> {
        if phys % PAGE_SIZE != 0 || phys.checked_add(PAGE_SIZE)? > self.limit {
            return None;
        }
        let va = self.offset.checked_add(phys)?;
        if va % PAGE_SIZE != 0 {
            return None;
        }
        // The direct map is an integer offset by nature: take the provenance the kernel exposed
        // when it set the map up.
        NonNull::new(core::ptr::with_exposed_provenance_mut::<u64>(
            usize::try_from(va).ok()?,
        ))
    }
}

/// Frames for new page tables.
pub trait FrameAlloc {
    /// A free 4 KiB frame's physical address (it is zeroed by the caller of this method), or
    /// `None` when memory is exhausted.
    fn alloc_frame(&mut self) -> Option<u64>;
}

impl<T: FrameAlloc + ?Sized> FrameAlloc for &mut T {
    fn alloc_frame(&mut self) -> Option<u64> {
        (**self).alloc_frame()
    }
}

/// No frames: for an address space that only loses or changes entries (a fork's parent).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFrames;

impl FrameAlloc for NoFrames {
    fn alloc_frame(&mut self) -> Option<u64> {
        None
    }
}

/// TLB invalidation for one address space.
pub trait TlbFlush {
    /// Invalidates `[start, end)` of the address space whose PML4 is at `root`.
    fn flush_range(&mut self, root: u64, start: u64, end: u64);
}

/// Invalidates this CPU's TLB with `INVLPG` (up to [`X86Tlb::INVLPG_MAX`] pages) or a CR3 reload,
/// when `root` is the active address space; an inactive one holds no entries (no PCID).
#[derive(Debug, Clone, Copy)]
pub struct X86Tlb(());

impl X86Tlb {
    /// Above this many pages a CR3 reload is cheaper than `INVLPG`s.
    pub const INVLPG_MAX: u64 = 32;

    /// The TLB of the CPU running the code.
    ///
    /// # Safety
    /// Ring 0 only (`MOV CR3` and `INVLPG` are privileged), without PCIDs in use. Other CPUs
    /// running the address space need a shootdown the kernel does itself.
    pub const unsafe fn new() -> Self {
        Self(())
    }
}

impl TlbFlush for X86Tlb {
    fn flush_range(&mut self, root: u64, start: u64, end: u64) {
        // SAFETY: `X86Tlb::new`'s contract: ring 0. Reading CR3 has no side effect.
        let cr3 = unsafe { ::x86::controlregs::cr3() };
        if cr3 & ADDR_MASK != root & ADDR_MASK {
            return;
        }
        let pages = end.saturating_sub(start) / PAGE_SIZE;
        if pages > Self::INVLPG_MAX {
            // SAFETY: ring 0 (contract of `new`); rewriting CR3 with its own value only drops
            // non-global translations.
            unsafe { ::x86::controlregs::cr3_write(cr3) };
            return;
        }
        for i in 0..pages {
            // SAFETY: ring 0 (contract of `new`); INVLPG only drops a cached translation.
            unsafe { ::x86::tlb::flush((start + i * PAGE_SIZE) as usize) };
        }
    }
}

/// No TLB to flush: an address space that is not loaded on any CPU (a child being built).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTlb;

impl TlbFlush for NoTlb {
    fn flush_range(&mut self, _root: u64, _start: u64, _end: u64) {}
}

/// A live x86-64 4-level address space, as a [`PageTable`] over its last-level tables.
///
/// Upper levels are walked through the window on each table change (the last table found is
/// cached). Huge (PS) mappings at the PDPT/PD level are not last-level tables: they read as
/// absent, [`PageTable::is_huge`] reports them, and copy and zap fail there with
/// [`Error::HugeMapping`]; a physical address the window does not cover reads as absent too, so a corrupt
/// table cannot lead the walker out of the window.
pub struct X86PageTables<W: PhysWindow, A: FrameAlloc, T: TlbFlush> {
    root: u64,
    window: W,
    alloc: A,
    tlb: T,
    /// (address >> 21, the last-level table's entries) of the last walk: every access within
    /// one table after the first is one compare and one load or store.
    cache: Cell<Option<(u64, NonNull<u64>)>>,
}

impl<W: PhysWindow, A: FrameAlloc, T: TlbFlush> X86PageTables<W, A, T> {
    /// The address space whose PML4 is the frame at `root` (its low 12 bits are ignored).
    ///
    /// # Safety
    /// `root` and every table reachable from it that the window covers must be page-table
    /// frames owned by this address space, not freed or changed by anyone else while this value
    /// is used except for the MMU's accessed/dirty updates (hold the kernel's page-table lock).
    /// Frames from `alloc` must be unused and covered by the window.
    pub unsafe fn new(root: u64, window: W, alloc: A, tlb: T) -> Self {
        Self {
            root: root & ADDR_MASK,
            window,
            alloc,
            tlb,
            cache: Cell::new(None),
        }
    }

    /// The PML4's physical address.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Gives back the window, allocator and TLB.
    pub fn into_parts(self) -> (W, A, T) {
        (self.window, self.alloc, self.tlb)
    }

    /// The slot for `index` in the table at `phys`.
    fn slot(&self, phys: u64, index: usize) -> Option<&AtomicU64> {
        let table = self.window.table(phys)?;
        Some(self.entry(table, index))
    }

    /// Entry `index` (masked to 9 bits) of the table at `table`, a pointer from the window.
    #[inline(always)]
    fn entry(&self, table: NonNull<u64>, index: usize) -> &AtomicU64 {
        // SAFETY: `table` came from this walker's window, which guarantees 512 valid u64s there
        // for as long as the window is used, which outlives `&self`; the index is masked to 9
        // bits; entries are only accessed atomically by this code and the MMU.
        unsafe { AtomicU64::from_ptr(table.as_ptr().add(index & (PTRS_PER_TABLE - 1))) }
    }

    fn index(addr: u64, level: u32) -> usize {
        ((addr >> (12 + 9 * level)) & 0x1ff) as usize
    }

    /// The last-level table mapping `addr`, if every upper level is present.
    #[inline(always)]
    fn walk(&self, addr: u64) -> Option<NonNull<u64>> {
        let key = addr >> 21;
        if let Some((k, t)) = self.cache.get() {
            if k == key {
                return Some(t);
            }
        }
        self.walk_slow(addr)
    }

    #[inline(never)]
    fn walk_slow(&self, addr: u64) -> Option<NonNull<u64>> {
        let mut table = self.root;
        for level in [3, 2, 1] {
            let e = self
                .slot(table, Self::index(addr, level))?
                .load(Ordering::Acquire);
            if e & X86Flags::PRESENT.bits() == 0 || (level < 3 && e & HUGE != 0) {
                return None;
            }
            table = e & ADDR_MASK;
        }
        let t = self.window.table(table)?;
        self.cache.set(Some((addr >> 21, t)));
        Some(t)
    }

    #[inline(always)]
    fn leaf(&self, addr: u64) -> Option<&AtomicU64> {
        let t = self.walk(addr)?;
        Some(self.entry(t, Self::index(addr, 0)))
    }

    /// Walks to `addr`'s last-level table, allocating missing levels.
    fn walk_alloc(&mut self, addr: u64) -> Result<NonNull<u64>, Error> {
        if let Some(t) = self.walk(addr) {
            return Ok(t);
        }
        let mut table = self.root;
        for level in [3, 2, 1] {
            let slot = self
                .slot(table, Self::index(addr, level))
                .ok_or(Error::NoMemory)?;
            let e = slot.load(Ordering::Acquire);
            if e & X86Flags::PRESENT.bits() != 0 {
                if level < 3 && e & HUGE != 0 {
                    // A huge mapping is in the way: not ours to split.
                    return Err(Error::HugeMapping { addr });
                }
                table = e & ADDR_MASK;
                continue;
            }
            let frame = self.alloc.alloc_frame().ok_or(Error::NoMemory)? & ADDR_MASK;
            let new = self.window.table(frame).ok_or(Error::NoMemory)?;
            for i in 0..PTRS_PER_TABLE {
                self.entry(new, i).store(0, Ordering::Relaxed);
            }
            // Release: the zeroed table is visible before the entry pointing to it.
            self.slot(table, Self::index(addr, level))
                .ok_or(Error::NoMemory)?
                .store(frame | TABLE_FLAGS, Ordering::Release);
            table = frame;
        }
        let t = self.window.table(table).ok_or(Error::NoMemory)?;
        self.cache.set(Some((addr >> 21, t)));
        Ok(t)
    }
}

impl<W: PhysWindow, A: FrameAlloc, T: TlbFlush> PageTable for X86PageTables<W, A, T> {
    type Format = X86Pte;

    #[inline(always)]
    fn get(&self, addr: u64) -> u64 {
        self.leaf(addr).map_or(0, |s| s.load(Ordering::Relaxed))
    }

    #[inline(always)]
    fn set(&mut self, addr: u64, pte: u64) {
        if let Some(s) = self.leaf(addr) {
            s.store(pte, Ordering::Relaxed);
        }
    }

    /// The entries in place, as atomics (one walk).
    #[inline]
    fn atomic_entries(&self, addr: u64, nr: usize) -> Option<&[AtomicU64]> {
        let t = self.walk(addr)?;
        let first = Self::index(addr, 0);
        if first + nr > PTRS_PER_TABLE {
            return None;
        }
        // SAFETY: the window guarantees 512 valid u64s at `t` for longer than `&self`;
        // `first + nr <= 512`; `AtomicU64` has the size and alignment of `u64`, and the entries
        // are only accessed atomically by this code and the MMU.
        Some(unsafe { core::slice::from_raw_parts(t.as_ptr().add(first).cast::<AtomicU64>(), nr) })
    }

    /// One walk, then one (atomic, relaxed) load per entry.
    #[inline]
    fn get_many(&self, addr: u64, out: &mut [u64]) {
        let Some(t) = self.walk(addr) else {
            out.fill(0);
            return;
        };
        let first = Self::index(addr, 0);
        let n = out.len().min(PTRS_PER_TABLE - first);
        for (i, o) in out[..n].iter_mut().enumerate() {
            *o = self.entry(t, first + i).load(Ordering::Relaxed);
        }
        out[n..].fill(0);
    }

    #[inline]
    fn set_ptes(&mut self, addr: u64, pte: u64, nr: usize) {
        let Some(t) = self.walk(addr) else { return };
        let first = Self::index(addr, 0);
        let last = first.saturating_add(nr).min(PTRS_PER_TABLE);
        let mut pte = pte;
        // Entry k is `pte` plus k steps while the PFN field does not overflow.
        let step = X86Pte::advance_pfn(pte, 1).wrapping_sub(pte);
        let exact = last > first
            && X86Pte::advance_pfn(pte, (last - first - 1) as u64)
                == pte.wrapping_add(step.wrapping_mul((last - first - 1) as u64));
        for i in first..last {
            self.entry(t, i).store(pte, Ordering::Relaxed);
            pte = if exact {
                pte.wrapping_add(step)
            } else {
                X86Pte::advance_pfn(pte, 1)
            };
        }
    }

    #[inline]
    fn wrprotect_ptes(&mut self, addr: u64, nr: usize) {
        let Some(t) = self.walk(addr) else { return };
        let first = Self::index(addr, 0);
        let last = first.saturating_add(nr).min(PTRS_PER_TABLE);
        for i in first..last {
            let s = self.entry(t, i);
            let v = s.load(Ordering::Relaxed);
            if v & X86Flags::RW.bits() != 0 {
                write_keeping_hw_bits(s, v, v & !X86Flags::RW.bits());
            }
        }
    }

    #[inline(always)]
    fn get_and_clear(&mut self, addr: u64) -> u64 {
        self.leaf(addr).map_or(0, take)
    }

    /// One walk, then one atomic exchange per entry; accessed/dirty gathered into the first.
    #[inline]
    fn get_and_clear_ptes(&mut self, addr: u64, nr: usize) -> u64 {
        let Some(t) = self.walk(addr) else { return 0 };
        let first = Self::index(addr, 0);
        let last = first.saturating_add(nr).min(PTRS_PER_TABLE);
        if last <= first {
            return 0;
        }
        let head = take(self.entry(t, first));
        let mut bits = 0;
        for i in first + 1..last {
            bits |= take(self.entry(t, i));
        }
        let mut head = head;
        if X86Pte::is_dirty(bits) {
            head = X86Pte::mkdirty(head);
        }
        if X86Pte::is_young(bits) {
            head = X86Pte::mkyoung(head);
        }
        head
    }

    fn flush_tlb_range(&mut self, start: u64, end: u64) {
        self.tlb.flush_range(self.root, start, end);
    }

    fn has_table(&self, addr: u64) -> bool {
        self.walk(addr).is_some()
    }

    fn is_huge(&self, addr: u64) -> bool {
        let mut table = self.root;
        for level in [3, 2, 1] {
            let Some(slot) = self.slot(table, Self::index(addr, level)) else {
                return false;
            };
            let e = slot.load(Ordering::Acquire);
            if e & X86Flags::PRESENT.bits() == 0 {
                return false;
            }
            if level < 3 && e & HUGE != 0 {
                return true;
            }
            table = e & ADDR_MASK;
        }
        false
    }

    fn prepare(&mut self, addr: u64) -> Result<(), Error> {
        self.walk_alloc(addr).map(|_| ())
    }
}
