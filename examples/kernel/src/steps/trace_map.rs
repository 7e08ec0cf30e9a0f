//! The trace buffer mapped read-only into a ring-3 task, the way Linux 6.10 maps
//! `per_cpu/cpuN/trace_pipe_raw`: the crate's map layout (meta page, then every sub-buffer by
//! ID) and its two system calls, map-trace-buffer ([`nr::MAP_TRACE_BUFFER`]) and get-reader
//! ([`nr::GET_READER`], what `TRACE_MMAP_IOCTL_GET_READER` does).
//!
//! It also writes what the mapped consumer is shown to the serial log, for the host to decode
//! with the crate's own reader (`cargo xtask run`): at the mapping and after every get-reader,
//! the reader sub-buffer when it changed (`TRACE-DUMP cpu=N page=ID <hex>`: header and committed
//! bytes) and the meta page (`TRACE-DUMP cpu=N meta=<hex>`). Replaying those steps in order
//! gives a host-side `MappedReader` exactly the bytes the ring-3 one read.
//!
//! **Mapping the pages.** The pages of a mapping are scattered frames, but `vm::map_fixed` maps
//! physically contiguous frames and a space has few regions. So the whole mapping is one fixed,
//! read-only region made by `map_fixed`, whose PTEs are then pointed at the right frames
//! ([`retarget`], walking the caller's page tables from CR3). The frames are the ring
//! buffer's: the space never frees them (`PTE_FIXED`), and the ring is unmapped (`rb.unmap`)
//! only after the task, and with it its address space, is gone ([`release`]).

use core::{
    fmt,
    sync::atomic::{AtomicBool, Ordering},
};

use oskit_ring_buffer::{
    MapPage,
    format::{COMMIT_MASK, PAGE_SIZE, RB_MISSED_STORED, SUBBUF_HEADER_SIZE, TraceBufferMeta},
};

use crate::{
    arch::gdt::MAX_CPUS,
    arch::syscall::{self, nr},
    arch::trap::TrapFrame,
    mm::vm,
    println,
    spin::SpinLock,
    task::sched,
    trace::{self, TraceBuffer},
};

const EINVAL: i64 = 22;
const EBUSY: i64 = 16;
const ENODEV: i64 = 19;
const EPERM: i64 = 1;

/// Large page bit of a PD or PDPT entry.
const PTE_PS: u64 = 1 << 7;

/// Per CPU buffer: the task that mapped it, and the reader sub-buffer last dumped (its ID and
/// `commit` word).
#[derive(Clone, Copy)]
struct Mapped {
    owner: sched::TaskId,
    dumped: Option<(u32, u64)>,
}

static MAPPED: SpinLock<[Option<Mapped>; MAX_CPUS]> = SpinLock::new([None; MAX_CPUS]);

/// Whether the mapping and get-reader calls write `TRACE-DUMP` lines.
static DUMP: AtomicBool = AtomicBool::new(false);

/// Turns the `TRACE-DUMP` lines on or off (the check brackets its readers with them).
pub fn set_dump(on: bool) {
    DUMP.store(on, Ordering::Relaxed);
}

/// Installs the map-trace-buffer and get-reader system calls.
pub fn install() {
    syscall::register(nr::MAP_TRACE_BUFFER, sys_map_trace_buffer);
    syscall::register(nr::GET_READER, sys_get_reader);
}

/// `map_trace_buffer(cpu, addr)`: maps CPU `cpu`'s buffer read-only at `addr` (page-aligned,
/// free) in the caller's space; returns the mapping's length in bytes.
fn sys_map_trace_buffer(frame: &mut TrapFrame) -> i64 {
    let (cpu, addr) = (frame.rdi as usize, frame.rsi);
    let Some(rb) = trace::buffer() else {
        return -ENODEV;
    };
    let (Some(me), Some(space)) = (sched::current(), sched::current_space()) else {
        return -EINVAL;
    };
    if cpu >= rb.cpus() {
        return -EINVAL;
    }
    {
        let mut mapped = MAPPED.lock();
        if mapped[cpu].is_some() {
            return -EBUSY;
        }
        if let Err(e) = rb.map(cpu) {
            return -i64::from(e.errno());
        }
        mapped[cpu] = Some(Mapped {
            owner: me,
            dumped: None,
        });
    }
    // From here on the ring stays mapped until `release`, even on error: PTEs made by a failed
    // `map_fixed` may already point at its pages.
    let Ok(layout) = rb.map_layout(cpu) else {
        return -EINVAL;
    };
    let len = layout.total_len() as u64;
    let Ok(pages) = layout.pages(0, layout.total_pages()) else {
        return -EINVAL;
    };
    let Ok(Some(first)) = rb.map_page(cpu, MapPage::Meta) else {
        return -EINVAL;
    };
    if let Err(e) = vm::map_fixed(space, addr, first.as_ptr() as u64, len, false) {
        return match e {
            vm::VmError::BadRange => -EINVAL,
            vm::VmError::NoMemory => -12,
        };
    }
    for (i, page) in pages.enumerate() {
        // Sub-buffers of one page: the layout has no zero-page padding.
        let Ok(Some(kernel)) = rb.map_page(cpu, page) else {
            return -EINVAL;
        };
        let vaddr = addr + (i * PAGE_SIZE) as u64;
        // SAFETY: CR3 holds the caller's space, loaded on this CPU only while its task (us, in
        // this system call with interrupts off) runs; `vaddr` is in the fixed region just made.
        if !unsafe { retarget(current_root(), vaddr, kernel.as_ptr() as u64) } {
            return -EINVAL;
        }
    }
    dump_step(rb, cpu);
    len as i64
}

/// `get_reader(cpu)`: hands the mapped consumer of `cpu`'s buffer its next reader sub-buffer.
fn sys_get_reader(frame: &mut TrapFrame) -> i64 {
    let cpu = frame.rdi as usize;
    let Some(rb) = trace::buffer() else {
        return -ENODEV;
    };
    let me = sched::current();
    let owner = MAPPED.lock().get(cpu).copied().flatten().map(|m| m.owner);
    if owner.is_none() {
        return -ENODEV;
    }
    if owner != me {
        return -EPERM;
    }
    if let Err(e) = rb.map_get_reader(cpu) {
        return -i64::from(e.errno());
    }
    dump_step(rb, cpu);
    0
}

/// The PML4 loaded on this CPU (in a system call: the caller's space).
fn current_root() -> u64 {
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    cr3 & vm::PTE_ADDR
}

/// Points the present, fixed, read-only user PTE of `vaddr` at `paddr`, and flushes it.
///
/// # Safety
/// `root` is the PML4 of the address space loaded on this CPU, whose tables nobody else
/// changes meanwhile.
unsafe fn retarget(root: u64, vaddr: u64, paddr: u64) -> bool {
    let mut table = root & vm::PTE_ADDR;
    for shift in [39, 30, 21] {
        // SAFETY: `table` is a page table of the space (identity-mapped), by the contract.
        let entry = unsafe {
            (table as *const u64)
                .add(((vaddr >> shift) & 511) as usize)
                .read()
        };
        if entry & vm::PTE_P == 0 || entry & PTE_PS != 0 {
            return false;
        }
        table = entry & vm::PTE_ADDR;
    }
    // SAFETY: as above, the last level.
    let pte = unsafe { (table as *mut u64).add(((vaddr >> 12) & 511) as usize) };
    // SAFETY: as above.
    let old = unsafe { pte.read() };
    let wanted = vm::PTE_P | vm::PTE_U | vm::PTE_FIXED;
    if old & (wanted | vm::PTE_W) != wanted {
        return false;
    }
    // SAFETY: as above; the entry stays a fixed read-only user mapping, of another frame.
    unsafe { pte.write((old & !vm::PTE_ADDR) | (paddr & vm::PTE_ADDR)) };
    // SAFETY: dropping a TLB entry is always safe.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) vaddr, options(nostack)) };
    true
}

/// Undoes the mapping of `cpu`'s buffer once the task that mapped it has exited (its address
/// space is gone). Returns whether it was mapped.
pub fn release(cpu: usize) -> bool {
    let Some(rb) = trace::buffer() else {
        return false;
    };
    let mut mapped = MAPPED.lock();
    let Some(slot) = mapped.get_mut(cpu) else {
        return false;
    };
    if slot.take().is_none() {
        return false;
    }
    rb.unmap(cpu).is_ok()
}

/// Bytes as lowercase hex.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 128];
        for chunk in self.0.chunks(out.len() / 2) {
            for (i, b) in chunk.iter().enumerate() {
                out[2 * i] = DIGITS[usize::from(b >> 4)];
                out[2 * i + 1] = DIGITS[usize::from(b & 15)];
            }
            // Only ASCII digits were written.
            f.write_str(core::str::from_utf8(&out[..2 * chunk.len()]).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

/// Copies `len` bytes at kernel address `src` (a page of the mapping) into `dst`.
fn copy_page(src: *const u8, dst: &mut [u8]) {
    for (i, b) in dst.iter_mut().enumerate() {
        // SAFETY: `dst` is at most a page long and `src` a page of the mapping, which stays
        // allocated while mapped. Volatile: the ring-3 side reads it concurrently (and a
        // writer could append to the commit page).
        *b = unsafe { src.add(i).read_volatile() };
    }
}

/// Writes one step of what the mapped consumer of `cpu` is shown: the reader sub-buffer when
/// it changed since the last step, then the meta page.
fn dump_step(rb: &TraceBuffer, cpu: usize) {
    if !DUMP.load(Ordering::Relaxed) {
        return;
    }
    let Ok(Some(meta_page)) = rb.map_page(cpu, MapPage::Meta) else {
        return;
    };
    let mut meta = [0u8; core::mem::size_of::<TraceBufferMeta>()];
    copy_page(meta_page.as_ptr(), &mut meta);
    // SAFETY: `meta` holds a `TraceBufferMeta`'s bytes (plain integers, any value is valid);
    // read unaligned from the byte array.
    let parsed = unsafe { meta.as_ptr().cast::<TraceBufferMeta>().read_unaligned() };
    let id = parsed.reader.id;
    if let Ok(Some(page)) = rb.map_page(cpu, MapPage::Subbuf { id, page: 0 }) {
        let mut header = [0u8; SUBBUF_HEADER_SIZE];
        copy_page(page.as_ptr(), &mut header);
        let commit = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        let last = MAPPED.lock()[cpu].and_then(|m| m.dumped);
        if last != Some((id, commit)) {
            let stored = if commit & RB_MISSED_STORED != 0 { 8 } else { 0 };
            let used = (SUBBUF_HEADER_SIZE + (commit & COMMIT_MASK) as usize + stored)
                .min(rb.subbuf_size());
            let mut bytes = [0u8; PAGE_SIZE];
            let bytes = &mut bytes[..used.min(PAGE_SIZE)];
            copy_page(page.as_ptr(), bytes);
            println!("TRACE-DUMP cpu={cpu} page={id} {}", Hex(bytes));
            if let Some(m) = MAPPED.lock()[cpu].as_mut() {
                m.dumped = Some((id, commit));
            }
        }
    }
    println!("TRACE-DUMP cpu={cpu} meta={}", Hex(&meta));
}
