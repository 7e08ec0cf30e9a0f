//! The small traits the tracer is written against: the CPU, the task and address-space
//! handles, the locked-page allocator, the deferred-work queue, and the overflow consumers.

use core::{num::NonZeroU32, ptr::NonNull};

use crate::format::Record;

/// What the CPU says about Branch Trace Store support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BtsSupport {
    /// CPUID.01H:EDX.DS\[bit 21\]: the Debug Store exists.
    pub debug_store: bool,
    /// CPUID.01H:ECX.DTES64\[bit 2\]: the 64-bit DS save area layout.
    pub dtes64: bool,
    /// IA32_MISC_ENABLE\[bit 11\] (BTS_UNAVAILABLE) read as clear.
    pub bts_enabled: bool,
}

impl BtsSupport {
    /// Decodes CPUID leaf 1 (`ecx`, `edx`) and IA32_MISC_ENABLE.
    pub const fn from_registers(leaf1_ecx: u32, leaf1_edx: u32, misc_enable: u64) -> Self {
        Self {
            debug_store: leaf1_edx & (1 << 21) != 0,
            dtes64: leaf1_ecx & (1 << 2) != 0,
            bts_enabled: misc_enable & (1 << 11) == 0,
        }
    }

    /// Whether BTS with the 64-bit DS layout can be used.
    pub const fn usable(&self) -> bool {
        self.debug_store && self.dtes64 && self.bts_enabled
    }
}

/// The BTS-related bits of IA32_DEBUGCTL (MSR 0x1D9).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct DebugCtl(pub u64);

impl DebugCtl {
    /// TR (bit 6): branch trace messages are generated.
    pub const TR: u64 = 1 << 6;
    /// BTS (bit 7): branch trace messages are stored in the BTS buffer.
    pub const BTS: u64 = 1 << 7;
    /// BTINT (bit 8): interrupt at the threshold instead of a circular buffer.
    pub const BTINT: u64 = 1 << 8;
    /// BTS_OFF_OS (bit 9): do not store branches taken at CPL 0.
    pub const BTS_OFF_OS: u64 = 1 << 9;
    /// BTS_OFF_USR (bit 10): do not store branches taken at CPL > 0.
    pub const BTS_OFF_USR: u64 = 1 << 10;
    /// All of the above.
    pub const BTS_MASK: u64 =
        Self::TR | Self::BTS | Self::BTINT | Self::BTS_OFF_OS | Self::BTS_OFF_USR;

    /// Whether `bit` (one of the constants) is set.
    pub const fn has(self, bit: u64) -> bool {
        self.0 & bit == bit
    }

    /// `self` with the BTS bits replaced by those of `bts` (other bits, LBR and so on, kept).
    pub const fn with_bts(self, bts: u64) -> Self {
        Self((self.0 & !Self::BTS_MASK) | (bts & Self::BTS_MASK))
    }
}

/// One CPU's Branch Trace Store controls.
///
/// The tracer keeps one per CPU inside a [`BtsCpu`](crate::BtsCpu) and only calls it on that
/// CPU, with interrupts disabled (context switch) or from the threshold interrupt (an NMI
/// with NMI delivery: then every method must be NMI-safe, as MSR and APIC register accesses
/// are).
pub trait BtsHardware {
    /// Reports what this CPU supports (CPUID.01H and IA32_MISC_ENABLE).
    fn probe(&self) -> BtsSupport;

    /// Reads IA32_DEBUGCTL.
    fn debugctl(&self) -> DebugCtl;

    /// Writes IA32_DEBUGCTL.
    ///
    /// # Safety
    /// If `value` enables BTS, the DS area last given to [`set_ds_area`](Self::set_ds_area)
    /// and the buffer it describes must stay valid and writable until BTS is disabled again:
    /// the processor writes records there on its own.
    unsafe fn set_debugctl(&mut self, value: DebugCtl);

    /// Reads IA32_DS_AREA.
    fn ds_area(&self) -> u64;

    /// Writes IA32_DS_AREA (the linear address of a [`DsArea`](crate::format::DsArea)).
    ///
    /// # Safety
    /// Same contract as [`set_debugctl`](Self::set_debugctl): while BTS is enabled, `linear`
    /// must point at a valid DS area whose BTS buffer is valid, writable memory.
    unsafe fn set_ds_area(&mut self, linear: u64);

    /// Re-arms the threshold interrupt (the local APIC masks its performance-monitoring LVT
    /// entry when it delivers the interrupt): writes the entry unmasked with the kernel's
    /// delivery mode. Called by the overflow handler and by a switch-out that handled an
    /// overflow the processor had signalled; with NMI delivery, from NMI context (so: one
    /// register write, no lock).
    fn rearm_threshold_interrupt(&mut self);
}

impl<H: BtsHardware + ?Sized> BtsHardware for &mut H {
    fn probe(&self) -> BtsSupport {
        (**self).probe()
    }
    fn debugctl(&self) -> DebugCtl {
        (**self).debugctl()
    }
    unsafe fn set_debugctl(&mut self, value: DebugCtl) {
        // SAFETY: the caller upholds the contract, which is the same.
        unsafe { (**self).set_debugctl(value) }
    }
    fn ds_area(&self) -> u64 {
        (**self).ds_area()
    }
    unsafe fn set_ds_area(&mut self, linear: u64) {
        // SAFETY: the caller upholds the contract, which is the same.
        unsafe { (**self).set_ds_area(linear) }
    }
    fn rearm_threshold_interrupt(&mut self) {
        (**self).rearm_threshold_interrupt()
    }
}

/// A counted reference on a task (`get_task_struct`): cloning takes a reference, dropping
/// puts it. A tracing context keeps one until its deferred teardown.
pub trait TaskRef: Clone {
    /// The task's id; it names the task in the tracer's operations and in SCHED records.
    fn pid(&self) -> u32;
}

/// A counted reference on an address space (`mmget`/`mmput`) that pays for locked memory.
///
/// A context keeps the handle of the space that paid for its buffer, so the refund reaches
/// that space even after the tracer exited.
pub trait AddressSpace: Clone {
    /// Charges `pages` locked pages (RLIMIT_MEMLOCK); `false` if over the limit.
    fn charge_locked(&self, pages: usize) -> bool;
    /// Gives back `pages` locked pages charged earlier.
    fn refund_locked(&self, pages: usize);
}

/// Page size of [`LockedAlloc`].
pub const PAGE_SIZE: usize = 4096;

/// An allocator of locked (non-pageable, always mapped) kernel pages, for DS areas and BTS
/// buffers that the processor writes on its own.
///
/// # Safety
/// A pointer returned by [`alloc_pages`](Self::alloc_pages) must be aligned to
/// [`PAGE_SIZE`], valid for reads and writes of `pages * PAGE_SIZE` bytes, not used by
/// anyone else, and stay so (mapped at the same linear address) until it is passed back to
/// [`free_pages`](Self::free_pages) with the same `pages`.
///
/// The processor reads the DS area and stores records through linear addresses, with
/// whatever page tables are current when the traced task branches. So the pages must be
/// mapped, present and writable at that same address in **every address space the task runs
/// in**: with split user/kernel page tables (page-table isolation), in the user half's tables
/// too (kernel-only, i.e. supervisor pages, so the task cannot read or write them), as Linux
/// maps its per-CPU DS areas into the user page tables. A page missing there makes the
/// processor fault on its own store.
pub unsafe trait LockedAlloc {
    /// Allocates `pages` (> 0) contiguous locked pages, or `None`.
    fn alloc_pages(&self, pages: usize) -> Option<NonNull<u8>>;
    /// Frees pages from [`alloc_pages`](Self::alloc_pages).
    ///
    /// # Safety
    /// `ptr` came from `alloc_pages(pages)` on this allocator and is not used afterwards.
    unsafe fn free_pages(&self, ptr: NonNull<u8>, pages: usize);
}

// SAFETY: forwards to `A`, which upholds the contract.
unsafe impl<A: LockedAlloc + ?Sized> LockedAlloc for &A {
    fn alloc_pages(&self, pages: usize) -> Option<NonNull<u8>> {
        (**self).alloc_pages(pages)
    }
    unsafe fn free_pages(&self, ptr: NonNull<u8>, pages: usize) {
        // SAFETY: the caller upholds the contract, which is the same.
        unsafe { (**self).free_pages(ptr, pages) }
    }
}

/// A deferred-work queue (`schedule_work`).
///
/// [`schedule`](Self::schedule) may be called with interrupts disabled (from
/// [`Bts::untrace`](crate::Bts::untrace) or a context-switch hook); it must not block or
/// allocate, only make sure [`Bts::run_deferred`](crate::Bts::run_deferred) runs soon in a
/// context where interrupts are enabled. Scheduling an already pending work is a no-op, as with
/// one static `work_struct`.
pub trait DeferredWork {
    /// Queues a run of [`Bts::run_deferred`](crate::Bts::run_deferred).
    fn schedule(&self);
}

impl<W: DeferredWork + ?Sized> DeferredWork for &W {
    fn schedule(&self) {
        (**self).schedule()
    }
}

/// Where an overflow is drained (for example a trace ring buffer).
///
/// Called by the threshold-interrupt handler and by the context-switch hooks, with interrupts
/// off on the CPU that overflowed; with NMI delivery from NMI context too. So it must not
/// block, allocate or take a lock the interrupted code may hold (a lock-free per-CPU buffer).
pub trait RecordSink {
    /// Takes one record (oldest first); `false` if it was dropped (the sink is full).
    fn push(&mut self, pid: u32, record: Record) -> bool;
}

impl<S: RecordSink + ?Sized> RecordSink for &mut S {
    fn push(&mut self, pid: u32, record: Record) -> bool {
        (**self).push(pid, record)
    }
}

/// Sends the overflow signal of a context configured with `SIGNAL`.
///
/// Called where [`RecordSink`] is (the threshold interrupt, the switch hooks with the
/// scheduler's locks held, NMI with NMI delivery): it must only queue the signal, without
/// blocking or taking the scheduler's or any other lock the interrupted code may hold (for
/// example set a pending bit and raise an irq-work that delivers it).
pub trait Signaller<T> {
    /// Queues `signal` to `task` (interrupts off, possibly NMI: must not block or lock).
    fn signal(&mut self, task: &T, signal: NonZeroU32);
}

impl<T, S: Signaller<T> + ?Sized> Signaller<T> for &mut S {
    fn signal(&mut self, task: &T, signal: NonZeroU32) {
        (**self).signal(task, signal)
    }
}
