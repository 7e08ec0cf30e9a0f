//! What the copy of the scaled fork step costs, batched and per PTE, on the same tables.
//!
//! Before the forking task starts, its 64 MiB of folios are copied into scratch child tables
//! twice, with `Fork::copy_range` (batched) and with the crate's per-PTE
//! `reference::copy_range`, over the backend types the kernel's own fork uses
//! ([`ptbatch::space_tables`], [`ptbatch::child_tables`], [`framemeta::Folios`]); the parent's
//! entries are first made to look as its writes leave them (writable, accessed, dirty). After
//! each copy the scratch tables are zapped (references and map counts back) and freed, and the
//! parent's entries are made writable again.
//!
//! Each variant runs twice: once bare, between two `RDTSC`s with interrupts off, and once
//! through counting wrappers, which give the exact work: entries read (a slice handed to the
//! batch scan counts whole) and written, backend calls, folio lookups, reference and rmap
//! updates, TLB range flushes. These counts are the same under TCG, KVM or hardware.
//!
//! The TSC delta is an instruction count only where the TSC advances once per instruction:
//! QEMU's TCG with `-icount shift=0` (QEMU documents that icount derives the virtual clock
//! from the executed instructions, one every 2^shift ns). [`tsc_counts_instructions`] checks
//! it: two loops of known length must differ by exactly their instructions, twice. Anywhere
//! else the delta is an emulation or virtualisation timing and is not reported.

use core::cell::Cell;

use oskit_pte_batch::{
    Error, Folio, FolioOps, Fork, MaybePinned, PageAlloc, PageTable, Rss, SwapCountFull, VmFlags,
    Vma, Zap, reference,
};

use crate::{
    mm::framemeta,
    mm::frames::{self, FRAME_SIZE},
    mm::ptbatch,
    mm::vm::{self, PTE_ADDR, PTE_P, PTE_U, PTE_W},
    spin,
};

/// Accessed and dirty (x86).
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;

/// The work of one copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measured {
    /// Present entries copied.
    pub ptes: u64,
    /// Entries read from the parent's tables.
    pub reads: u64,
    /// Entries written (child entries set, parent entries write-protected).
    pub writes: u64,
    /// Calls into the page-table backend (each may walk to its table).
    pub calls: u64,
    /// Folio lookups (`struct page` of a frame).
    pub lookups: u64,
    /// Reference and rmap updates (each may cover many pages).
    pub updates: u64,
    /// Parent TLB range flushes.
    pub flushes: u64,
    /// Instructions of the bare copy, when the TSC counts instructions (`-icount shift=0`).
    pub insns: Option<u64>,
}

/// A page table that counts what goes through it.
struct Counted<P> {
    inner: P,
    reads: Cell<u64>,
    writes: u64,
    calls: Cell<u64>,
    flushes: u64,
}

impl<P> Counted<P> {
    fn new(inner: P) -> Self {
        Self {
            inner,
            reads: Cell::new(0),
            writes: 0,
            calls: Cell::new(0),
            flushes: 0,
        }
    }
    fn read(&self, n: usize) {
        self.reads.set(self.reads.get() + n as u64);
        self.calls.set(self.calls.get() + 1);
    }
    fn write(&mut self, n: usize) {
        self.writes += n as u64;
        self.calls.set(self.calls.get() + 1);
    }
}

impl<P: PageTable> PageTable for Counted<P> {
    type Format = P::Format;
    fn get(&self, addr: u64) -> u64 {
        self.read(1);
        self.inner.get(addr)
    }
    fn set(&mut self, addr: u64, pte: u64) {
        self.write(1);
        self.inner.set(addr, pte)
    }
    fn get_many(&self, addr: u64, out: &mut [u64]) {
        self.read(out.len());
        self.inner.get_many(addr, out)
    }
    fn raw_entries(&self, addr: u64, nr: usize) -> Option<&[u64]> {
        let r = self.inner.raw_entries(addr, nr);
        self.read(r.map_or(0, <[u64]>::len));
        r
    }
    fn atomic_entries(&self, addr: u64, nr: usize) -> Option<&[core::sync::atomic::AtomicU64]> {
        let r = self.inner.atomic_entries(addr, nr);
        self.read(r.map_or(0, <[_]>::len));
        r
    }
    fn get_run(&self, addr: u64) -> (u64, usize) {
        self.read(1);
        self.inner.get_run(addr)
    }
    fn set_ptes(&mut self, addr: u64, pte: u64, nr: usize) {
        self.write(nr);
        self.inner.set_ptes(addr, pte, nr)
    }
    fn wrprotect_ptes(&mut self, addr: u64, nr: usize) {
        self.write(nr);
        self.inner.wrprotect_ptes(addr, nr)
    }
    fn get_and_clear(&mut self, addr: u64) -> u64 {
        self.write(1);
        self.inner.get_and_clear(addr)
    }
    fn get_and_clear_ptes(&mut self, addr: u64, nr: usize) -> u64 {
        self.write(nr);
        self.inner.get_and_clear_ptes(addr, nr)
    }
    fn flush_tlb_range(&mut self, start: u64, end: u64) {
        self.flushes += 1;
        self.inner.flush_tlb_range(start, end)
    }
    fn lazy_mmu_enter(&mut self) {
        self.inner.lazy_mmu_enter()
    }
    fn lazy_mmu_leave(&mut self) {
        self.inner.lazy_mmu_leave()
    }
    fn has_table(&self, addr: u64) -> bool {
        self.calls.set(self.calls.get() + 1);
        self.inner.has_table(addr)
    }
    fn is_huge(&self, addr: u64) -> bool {
        self.calls.set(self.calls.get() + 1);
        self.inner.is_huge(addr)
    }
    fn prepare(&mut self, addr: u64) -> Result<(), Error> {
        self.calls.set(self.calls.get() + 1);
        self.inner.prepare(addr)
    }
}

/// The kernel's folio metadata, counting lookups and updates.
#[derive(Default)]
struct CountedFolios {
    inner: framemeta::Folios,
    lookups: Cell<u64>,
    updates: u64,
}

impl FolioOps for CountedFolios {
    fn folio(&self, pfn: u64) -> Option<Folio> {
        self.lookups.set(self.lookups.get() + 1);
        self.inner.folio(pfn)
    }
    fn ref_add(&mut self, folio: &Folio, nr: usize) {
        self.updates += 1;
        self.inner.ref_add(folio, nr)
    }
    fn ref_sub(&mut self, folio: &Folio, nr: usize) {
        self.updates += 1;
        self.inner.ref_sub(folio, nr)
    }
    fn try_dup_anon_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize) -> Result<(), MaybePinned> {
        self.updates += 1;
        self.inner.try_dup_anon_rmap(folio, pfn, nr)
    }
    fn dup_file_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize) {
        self.updates += 1;
        self.inner.dup_file_rmap(folio, pfn, nr)
    }
    fn remove_rmap(&mut self, folio: &Folio, pfn: u64, nr: usize) {
        self.updates += 1;
        self.inner.remove_rmap(folio, pfn, nr)
    }
    fn add_new_anon_rmap(&mut self, pfn: u64) {
        self.updates += 1;
        self.inner.add_new_anon_rmap(pfn)
    }
    fn mapcount(&self, pfn: u64) -> usize {
        self.lookups.set(self.lookups.get() + 1);
        self.inner.mapcount(pfn)
    }
    fn is_anon_exclusive(&self, pfn: u64) -> bool {
        self.lookups.set(self.lookups.get() + 1);
        self.inner.is_anon_exclusive(pfn)
    }
    fn mark_dirty(&mut self, folio: &Folio) {
        self.inner.mark_dirty(folio)
    }
    fn mark_accessed(&mut self, folio: &Folio) {
        self.inner.mark_accessed(folio)
    }
    fn swap_dup(&mut self, pte: u64) -> Result<(), SwapCountFull> {
        self.inner.swap_dup(pte)
    }
    fn swap_count_continuation(&mut self, pte: u64) -> Result<(), Error> {
        self.inner.swap_count_continuation(pte)
    }
    fn swap_free(&mut self, pte: u64) {
        self.inner.swap_free(pte)
    }
    fn restore_device_exclusive(&mut self, pfn: u64) -> bool {
        self.inner.restore_device_exclusive(pfn)
    }
}

impl PageAlloc for CountedFolios {
    fn alloc_page(&mut self) -> Option<u64> {
        self.inner.alloc_page()
    }
    fn free_page(&mut self, pfn: u64) {
        self.inner.free_page(pfn)
    }
    fn copy_page(&mut self, dst: u64, src: u64) -> Result<(), Error> {
        self.inner.copy_page(dst, src)
    }
}

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC reads the time-stamp counter (CR4.TSD is clear: ring 0 anyway).
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    u64::from(hi) << 32 | u64::from(lo)
}

/// TSC ticks across a loop of `n` iterations of two instructions. Never inlined: every call
/// must run the same instructions around the loop (icount counts whole translated blocks, so
/// code around an `RDTSC` that differs per call site shifts the reading).
#[inline(never)]
fn loop_ticks(n: u64) -> u64 {
    let t0 = rdtsc();
    // SAFETY: a register-only countdown loop.
    unsafe {
        core::arch::asm!("2:", "dec {n}", "jnz 2b", n = inout(reg) n => _, options(nomem, nostack))
    };
    rdtsc().wrapping_sub(t0)
}

/// Whether the TSC advances by exactly one per instruction executed here (QEMU TCG with
/// `-icount shift=0`): 2,000 more loop iterations must take exactly 4,000 more ticks, twice.
/// Interrupts must be off.
fn tsc_counts_instructions() -> bool {
    (0..2).all(|_| {
        let short = loop_ticks(1000);
        loop_ticks(3000).wrapping_sub(short) == 4000
    })
}

/// The VMA of the folio region, as `vm` describes a private writable anonymous region.
fn vma() -> Vma {
    Vma::new(VmFlags::WRITE | VmFlags::MAYWRITE, PTE_P | PTE_U)
}

/// Sets `bits` in every present entry of `[start, end)` of the space at `root`.
fn set_bits(root: u64, start: u64, end: u64, bits: u64) {
    // SAFETY: a space no task runs yet (the caller's set-up), so loaded nowhere and changed by
    // nobody else.
    let mut tables = unsafe { ptbatch::space_tables(root) };
    let mut addr = start;
    while addr < end {
        let pte = tables.get(addr);
        if pte & PTE_P != 0 {
            tables.set(addr, pte | bits);
        }
        addr += FRAME_SIZE;
    }
}

/// Frees the tables of a scratch hierarchy (every PML4 entry is user; no pages left mapped).
fn free_scratch(table: u64, level: u32) {
    if level > 1 {
        for i in 0..512 {
            // SAFETY: a table of the scratch hierarchy, identity-mapped, ours alone.
            let entry = unsafe { ((table + i * 8) as *const u64).read() };
            if entry & PTE_P != 0 {
                free_scratch(entry & PTE_ADDR, level - 1);
            }
        }
    }
    frames::free(table, 0);
}

/// Copies `[start, end)` of the space at `root` into a fresh scratch hierarchy, batched or per
/// PTE, counted or bare (then timed); undoes it all.
fn copy_once(
    root: u64,
    start: u64,
    end: u64,
    batched: bool,
    counted: bool,
) -> Result<Measured, &'static str> {
    let scratch = frames::alloc(0).ok_or("no frame for a scratch PML4")?;
    // SAFETY: a frame we just allocated, identity-mapped.
    unsafe { core::ptr::write_bytes(scratch as *mut u8, 0, FRAME_SIZE as usize) };
    // SAFETY: the parent is a space no task runs yet (loaded nowhere, changed by nobody else);
    // the scratch hierarchy is ours and never loaded.
    let (mut src, mut dst) =
        unsafe { (ptbatch::space_tables(root), ptbatch::child_tables(scratch)) };
    let vma = vma();
    let mut m = Measured::default();
    let irq = spin::irq_save();
    let done = if counted {
        let (mut s, mut d, mut f) = (
            Counted::new(&mut src),
            Counted::new(&mut dst),
            CountedFolios::default(),
        );
        let done = copy(&mut d, &mut s, &mut f, batched, start, end, &mut m);
        m.reads = s.reads.get() + d.reads.get();
        m.writes = s.writes + d.writes;
        m.calls = s.calls.get() + d.calls.get();
        m.flushes = s.flushes + d.flushes;
        m.lookups = f.lookups.get();
        m.updates = f.updates;
        done
    } else {
        let mut f = framemeta::Folios;
        let calibrated = tsc_counts_instructions();
        let t0 = rdtsc();
        let done = copy(&mut dst, &mut src, &mut f, batched, start, end, &mut m);
        let ticks = rdtsc().wrapping_sub(t0);
        m.insns = calibrated.then_some(ticks);
        done
    };
    spin::irq_restore(irq);
    let zapped = Zap::new(&mut framemeta::Folios, vma).zap_range(&mut dst, start, end);
    free_scratch(scratch, 4);
    set_bits(root, start, end, PTE_W);
    done.map_err(|_| "the scratch copy failed")?;
    zapped.map_err(|_| "the scratch zap failed")?;
    Ok(m)
}

fn copy<D, S, M>(
    dst: &mut D,
    src: &mut S,
    mem: &mut M,
    batched: bool,
    start: u64,
    end: u64,
    m: &mut Measured,
) -> Result<(), Error>
where
    D: PageTable,
    S: PageTable<Format = D::Format>,
    M: FolioOps + PageAlloc,
{
    let vma = vma();
    let mut rss = Rss::default();
    let done = if batched {
        let mut fork = Fork::new(mem, vma, vma);
        let done = fork.copy_range(dst, src, start, end);
        rss = fork.rss();
        done
    } else {
        reference::copy_range(dst, src, mem, vma, vma, start, end, &mut rss)
    };
    m.ptes = rss.anon as u64;
    done
}

/// Copies the region `[start, end)` of `space` (set up, not running) batched and per PTE into
/// scratch tables: `[batched, per-PTE]`. Every reference, map count and entry is as before
/// afterwards, but the parent's entries are left accessed and dirty.
pub fn measure(space: vm::SpaceId, start: u64, end: u64) -> Result<[Measured; 2], &'static str> {
    let root = vm::root(space);
    set_bits(root, start, end, PTE_A | PTE_D);
    let mut out = [Measured::default(); 2];
    for (i, batched) in [true, false].into_iter().enumerate() {
        let bare = copy_once(root, start, end, batched, false)?;
        let counted = copy_once(root, start, end, batched, true)?;
        if bare.ptes != counted.ptes {
            return Err("the bare and counted copies copied different numbers of PTEs");
        }
        out[i] = Measured {
            insns: bare.insns,
            ..counted
        };
    }
    Ok(out)
}
