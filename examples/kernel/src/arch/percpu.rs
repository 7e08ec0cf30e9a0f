//! Per-CPU data, reached through the GS base.
//!
//! In ring 0, `IA32_GS_BASE` points at this CPU's [`PerCpu`] and `IA32_KERNEL_GS_BASE` holds the
//! user's GS base (always 0 here). Every entry from ring 3 (SYSCALL, and interrupts or
//! exceptions whose saved CS has RPL 3) executes `swapgs` first and again just before returning
//! to ring 3, so kernel code always finds its `PerCpu` at `gs:0`. Entries from ring 0 do not
//! swap. The assembly in [`crate::arch::syscall`] uses the fixed offsets below.

use core::{
    arch::asm,
    sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
};

use crate::arch::gdt::MAX_CPUS;

/// `gs:` offset of the user RSP saved by the SYSCALL entry.
pub const USER_RSP_OFFSET: usize = 8;
/// `gs:` offset of the kernel stack top the SYSCALL entry switches to.
pub const KERNEL_STACK_OFFSET: usize = 16;

/// `current` when the CPU runs its scheduler loop rather than a task.
pub const NO_TASK: usize = usize::MAX;

/// One CPU's data. Only the first three fields have a fixed layout (used from assembly).
#[repr(C)]
pub struct PerCpu {
    /// Address of this structure (`gs:0`), so Rust code can find it with one load.
    self_ptr: AtomicU64,
    /// Scratch for the SYSCALL entry: the user RSP until it is pushed on the kernel stack.
    user_rsp: AtomicU64,
    /// Top of the kernel stack of the task running here (TSS.RSP0 holds the same value).
    pub kernel_stack: AtomicU64,
    /// The CPU index (0 = the boot CPU), dense, below [`MAX_CPUS`].
    pub id: AtomicUsize,
    /// The local APIC id.
    pub apic_id: AtomicU32,
    /// Set once the CPU has finished its bring-up and runs the scheduler.
    pub online: AtomicBool,
    /// Set while the CPU's scheduler loop found nothing to run and halts.
    pub idle: AtomicBool,
    /// Saved RSP of this CPU's scheduler loop while a task runs.
    pub sched_rsp: AtomicU64,
    /// Slot of the task running here, or [`NO_TASK`].
    pub current: AtomicUsize,
    /// Timer interrupts taken on this CPU.
    pub ticks: AtomicU64,
    /// Tasks this CPU switched to.
    pub switches: AtomicU64,
}

const fn empty() -> PerCpu {
    PerCpu {
        self_ptr: AtomicU64::new(0),
        user_rsp: AtomicU64::new(0),
        kernel_stack: AtomicU64::new(0),
        id: AtomicUsize::new(0),
        apic_id: AtomicU32::new(0),
        online: AtomicBool::new(false),
        idle: AtomicBool::new(false),
        sched_rsp: AtomicU64::new(0),
        current: AtomicUsize::new(NO_TASK),
        ticks: AtomicU64::new(0),
        switches: AtomicU64::new(0),
    }
}

const _: () = {
    assert!(core::mem::offset_of!(PerCpu, user_rsp) == USER_RSP_OFFSET);
    assert!(core::mem::offset_of!(PerCpu, kernel_stack) == KERNEL_STACK_OFFSET);
};

static CPUS: [PerCpu; MAX_CPUS] = [const { empty() }; MAX_CPUS];

const IA32_GS_BASE: u32 = 0xc000_0101;
const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Points this CPU's GS base at `CPUS[cpu]` and records its id and APIC id.
///
/// # Safety
/// Called once on CPU `cpu` itself (in ring 0, with the kernel's GS), before anything on this
/// CPU calls [`this_cpu`].
pub unsafe fn init(cpu: usize, apic_id: u32) {
    let me = &CPUS[cpu];
    let addr = me as *const PerCpu as u64;
    me.self_ptr.store(addr, Ordering::Relaxed);
    me.id.store(cpu, Ordering::Relaxed);
    me.apic_id.store(apic_id, Ordering::Relaxed);
    // SAFETY: by the contract we are in ring 0 on `cpu`; GS is only used through `this_cpu`.
    unsafe {
        x86::msr::wrmsr(IA32_GS_BASE, addr);
        x86::msr::wrmsr(IA32_KERNEL_GS_BASE, 0);
    }
}

/// This CPU's data. The answer stays right only while the caller cannot migrate (interrupts
/// off, or a value that does not care, like statistics).
pub fn this_cpu() -> &'static PerCpu {
    let addr: u64;
    // SAFETY: after `init`, kernel-mode GS points at a `PerCpu` whose first field is its own
    // address; the load has no side effects.
    unsafe { asm!("mov {}, gs:[0]", out(reg) addr, options(nostack, readonly, preserves_flags)) };
    debug_assert!(addr != 0, "per-CPU data used before percpu::init");
    // SAFETY: `addr` is the address of an element of the static `CPUS`.
    unsafe { &*(addr as *const PerCpu) }
}

/// The index of the CPU this runs on (see [`this_cpu`] about migration).
pub fn cpu_id() -> usize {
    this_cpu().id.load(Ordering::Relaxed)
}

/// CPU `cpu`'s data (for statistics and bring-up).
pub fn cpu(cpu: usize) -> &'static PerCpu {
    &CPUS[cpu]
}

/// How many CPUs are online (the boot CPU and every AP that finished bring-up).
pub fn online_count() -> usize {
    CPUS.iter()
        .filter(|c| c.online.load(Ordering::Acquire))
        .count()
}
