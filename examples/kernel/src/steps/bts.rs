//! Scenario step `bts`: per-task branch tracing with `oskit-bts`.
//!
//! The real backend (`x86::Cpu`) probes the CPU first. Where BTS is usable the check traces a
//! code region of its own task for real (circular buffer, interrupts off while the region
//! runs). Under QEMU (neither TCG nor KVM offers BTS) it says so and runs the same tracer on
//! the crate's software CPU (`sim::SoftCpu`), one per kernel CPU:
//!
//! - the check (the tracer) configures a context for a kernel task (`bts-traced`) in
//!   threshold-interrupt mode with SCHED records, paid by a locked-memory account;
//! - the task runs a code region with real branches (a jump, a taken conditional, a call, its
//!   return and a jump back) and feeds each one, with the addresses it really executed, to the
//!   software CPU of the CPU it runs on; when it moves to another CPU it runs the crate's
//!   switch-out/switch-in hooks (the kernel's scheduler has no BTS hooks);
//! - when the software CPU reaches the threshold it "delivers the PMI": the kernel sends itself
//!   an interrupt at [`PMI_VECTOR`], whose handler calls `threshold_interrupt`, which drains
//!   the records oldest first into a `RecordSink` that writes each to the trace buffer
//!   (`trace!("bts", "from=.. to=..")`) and compares it with the branch the task made; an
//!   overflow found at a switch (the PMI raised just before the task moved, or SCHED records
//!   reaching the threshold) is drained the same way by the switch hook, and the PMI that
//!   follows is `Late` (the crate re-arms the LVT in both cases; a PMI it does not claim
//!   fails the check);
//! - the tracer drains the rest, then untraces the task with interrupts off: the crate only
//!   unlinks and schedules, and the deferred teardown runs later on the kernel work queue, in
//!   `kworker`, which frees the buffer's frames and refunds the locked pages;
//! - the whole run is done twice: with the PMI at [`PMI_VECTOR`], then delivered as an NMI
//!   (a self-NMI through the ICR), whose handler goes through `Bts::nmi` and the per-CPU
//!   `CpuCell` (tried, never waited on) and must never find it held.

use core::{
    arch::asm,
    ptr::NonNull,
    sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering},
};

use oskit_bts::{
    Bts, BtsCpu, Config, CpuCell, CpuGuard, Error as BtsError, Flags, Overflow, Pmi, Record,
    hal::{AddressSpace, BtsHardware, DeferredWork, LockedAlloc, RecordSink, Signaller, TaskRef},
    sim::{SoftCpu, Store},
    x86::{Cpu, LvtPmi},
};

use crate::{
    arch::apic,
    arch::gdt::MAX_CPUS,
    arch::percpu,
    arch::trap::{self, Handled, TrapFrame},
    checks::{self, Outcome},
    ensure, fail,
    mm::frames,
    println, spin,
    task::sched::{self, TaskId},
    task::workqueue,
};

/// The vector of the (real or modelled) BTS threshold interrupt.
pub const PMI_VECTOR: u8 = 0xf0;
/// The xAPIC's LVT performance-counter register (the kernel maps the xAPIC page uncached).
const XAPIC_LVT_PMI: u64 = 0xfee0_0000 + oskit_bts::x86::XAPIC_LVT_PMI_OFFSET as u64;

/// Records the context's buffer holds (one locked page with its DS area).
const CAPACITY: usize = 64;
/// Steps of the traced region the task runs; each makes [`BRANCHES_PER_STEP`] branches.
const STEPS: usize = 60;
/// Branches of one step of the region.
const BRANCHES_PER_STEP: usize = 5;
/// Most branches the task makes.
const MAX_BRANCHES: usize = STEPS * BRANCHES_PER_STEP;
/// Most pages the tracer's account may lock.
const LOCKED_LIMIT: usize = 4;

// ---------------------------------------------------------------------------------------------
// The kernel's side of the crate's traits.

/// References held on traced tasks, and on the paying account (must both end at 0).
static TASK_REFS: AtomicI64 = AtomicI64::new(0);
static ACCOUNT_REFS: AtomicI64 = AtomicI64::new(0);
/// Pages locked by the tracer's account.
static LOCKED_PAGES: AtomicUsize = AtomicUsize::new(0);

/// A counted reference on a kernel task.
struct KTask(TaskId);

impl KTask {
    fn new(id: TaskId) -> Self {
        TASK_REFS.fetch_add(1, Ordering::Relaxed);
        Self(id)
    }
}

impl Clone for KTask {
    fn clone(&self) -> Self {
        Self::new(self.0)
    }
}

impl Drop for KTask {
    fn drop(&mut self) {
        TASK_REFS.fetch_sub(1, Ordering::Relaxed);
    }
}

impl TaskRef for KTask {
    fn pid(&self) -> u32 {
        // Slot and generation: unique among the tasks alive at once.
        self.0.pid() as u32
    }
}

/// The tracer's locked-memory account (RLIMIT_MEMLOCK), counted.
struct Account;

impl Account {
    fn new() -> Self {
        ACCOUNT_REFS.fetch_add(1, Ordering::Relaxed);
        Self
    }
}

impl Clone for Account {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        ACCOUNT_REFS.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AddressSpace for Account {
    fn charge_locked(&self, pages: usize) -> bool {
        LOCKED_PAGES
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |p| {
                (p + pages <= LOCKED_LIMIT).then_some(p + pages)
            })
            .is_ok()
    }
    fn refund_locked(&self, pages: usize) {
        LOCKED_PAGES.fetch_sub(pages, Ordering::AcqRel);
    }
}

/// Locked pages straight from the frame allocator (identity-mapped, never paged).
struct FramePages;

fn order_of(pages: usize) -> u32 {
    pages.next_power_of_two().trailing_zeros()
}

// SAFETY: `frames::alloc(order)` hands out 2^order >= `pages` exclusive, naturally aligned
// (so page-aligned), identity-mapped frames that stay mapped at the same address; they go back
// only through `free_pages`, with the same order.
unsafe impl LockedAlloc for FramePages {
    fn alloc_pages(&self, pages: usize) -> Option<NonNull<u8>> {
        let paddr = frames::alloc(order_of(pages))?;
        NonNull::new(paddr as *mut u8)
    }
    unsafe fn free_pages(&self, ptr: NonNull<u8>, pages: usize) {
        frames::free(ptr.as_ptr() as u64, order_of(pages));
    }
}

/// The deferred teardown: one work item on the kernel work queue at a time.
struct Teardown;

static TEARDOWN_PENDING: AtomicBool = AtomicBool::new(false);
static TEARDOWNS: AtomicUsize = AtomicUsize::new(0);
static TEARDOWN_RUNS: AtomicUsize = AtomicUsize::new(0);
static TEARDOWN_OUTSIDE_WORKER: AtomicUsize = AtomicUsize::new(0);
static TEARDOWN_AT_US: AtomicU64 = AtomicU64::new(0);
static QUEUE_FULL: AtomicUsize = AtomicUsize::new(0);

impl DeferredWork for Teardown {
    fn schedule(&self) {
        if !TEARDOWN_PENDING.swap(true, Ordering::AcqRel) && !workqueue::queue(run_teardown, 0) {
            TEARDOWN_PENDING.store(false, Ordering::Release);
            QUEUE_FULL.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn run_teardown(_: u64) {
    TEARDOWN_PENDING.store(false, Ordering::Release);
    let done = BTS.run_deferred();
    TEARDOWN_RUNS.fetch_add(1, Ordering::Relaxed);
    if done > 0 {
        TEARDOWNS.fetch_add(done, Ordering::AcqRel);
        TEARDOWN_AT_US.store(apic::now_us(), Ordering::Release);
        if sched::current_name() != "kworker" {
            TEARDOWN_OUTSIDE_WORKER.fetch_add(1, Ordering::Relaxed);
        }
    }
    crate::trace!(
        "bts",
        "deferred teardown in {}: {done} context(s) torn down",
        sched::current_name()
    );
}

/// The kernel's branch tracer: up to 4 contexts.
static BTS: Bts<KTask, Account, FramePages, Teardown, 4> = Bts::new(FramePages, Teardown);

/// Overflow signals are not used (no `SIGNAL` flag); counted if one is ever sent.
struct NoSignals;
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

impl Signaller<KTask> for NoSignals {
    fn signal(&mut self, _task: &KTask, _signal: core::num::NonZeroU32) {
        SIGNALS.fetch_add(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// What was generated and what reached the trace buffer.

/// The branches the CPU stored, in order (from, to): what the drains must give back. A branch
/// the CPU refuses (buffer full: the threshold interrupt came late, as under a KVM that emulates
/// ring 0 and delivers the self-IPI late) is not in the trace, as with real BTS.
static EXPECTED: [(AtomicU64, AtomicU64); MAX_BRANCHES] =
    [const { (AtomicU64::new(0), AtomicU64::new(0)) }; MAX_BRANCHES];
/// Branches made, stored by the CPU, refused (buffer full), not stored (tracing off).
static GENERATED: AtomicUsize = AtomicUsize::new(0);
static STORED: AtomicUsize = AtomicUsize::new(0);
static FULL: AtomicUsize = AtomicUsize::new(0);
/// Branches whose source or target lies outside the traced region (there should be none).
static OUTSIDE: AtomicUsize = AtomicUsize::new(0);
static NOT_STORED: AtomicUsize = AtomicUsize::new(0);
/// Branch records drained (in order, matching), mismatching, SCHED and invalid records drained.
static DRAINED: AtomicUsize = AtomicUsize::new(0);
static MISMATCHED: AtomicUsize = AtomicUsize::new(0);
/// Index of the first drained branch record that differs (`usize::MAX`: none).
static FIRST_MISMATCH: AtomicUsize = AtomicUsize::new(usize::MAX);
static SCHED_DRAINED: AtomicUsize = AtomicUsize::new(0);
static INVALID: AtomicUsize = AtomicUsize::new(0);
/// SCHED records the hooks were expected to write (one per switch-in and switch-out).
static SCHED_EXPECTED: AtomicUsize = AtomicUsize::new(0);
/// Overflows handled (by the threshold interrupt or by a switch hook), records they drained,
/// truncated, buffer-full reports; PMIs that came after their overflow was handled at a
/// switch-out (late), and PMIs the crate did not claim (there should be none: BTS is the
/// kernel's only PMI source, and the crate re-arms the LVT itself).
static DRAINS: AtomicUsize = AtomicUsize::new(0);
static PMI_DRAINED: AtomicUsize = AtomicUsize::new(0);
static TRUNCATED: AtomicUsize = AtomicUsize::new(0);
static FULL_REPORTS: AtomicUsize = AtomicUsize::new(0);
static LATE: AtomicUsize = AtomicUsize::new(0);
static SPURIOUS: AtomicUsize = AtomicUsize::new(0);
/// PMIs sent.
static PMIS: AtomicUsize = AtomicUsize::new(0);

/// Writes each record into the trace buffer and checks branches against what the task made.
struct TraceSink;

impl RecordSink for TraceSink {
    fn push(&mut self, pid: u32, record: Record) -> bool {
        match record {
            Record::Branch { from, to, .. } => {
                let k = DRAINED.fetch_add(1, Ordering::AcqRel);
                let matches = EXPECTED.get(k).is_some_and(|(f, t)| {
                    f.load(Ordering::Acquire) == from && t.load(Ordering::Acquire) == to
                });
                if !matches {
                    MISMATCHED.fetch_add(1, Ordering::Relaxed);
                    FIRST_MISMATCH.fetch_min(k, Ordering::Relaxed);
                }
                crate::trace!("bts", "from={from:#x} to={to:#x}");
            }
            Record::TaskArrives { timestamp, pid } => {
                SCHED_DRAINED.fetch_add(1, Ordering::Relaxed);
                crate::trace!("bts", "pid {pid:#x} arrives at tsc {timestamp}");
            }
            Record::TaskDeparts { timestamp, pid } => {
                SCHED_DRAINED.fetch_add(1, Ordering::Relaxed);
                crate::trace!("bts", "pid {pid:#x} departs at tsc {timestamp}");
            }
            Record::Invalid => {
                INVALID.fetch_add(1, Ordering::Relaxed);
                crate::trace!("bts", "invalid record in the trace of {pid:#x}");
            }
        }
        true
    }
}

// ---------------------------------------------------------------------------------------------
// The software CPUs and their threshold interrupt.

/// The software BTS unit of each kernel CPU, in a cell the NMI handler only tries.
static SOFT: [CpuCell<SoftCpu>; MAX_CPUS] =
    [const { CpuCell::new(BtsCpu::new(SoftCpu::with_support(SOFT_SUPPORT))) }; MAX_CPUS];

/// Takes CPU `cpu`'s BTS state (not from NMI context): its holder is a hook or handler on
/// some CPU, which lets go quickly; on this CPU only an NMI can hold it, and it finishes
/// before we resume.
fn soft(cpu: usize) -> CpuGuard<'static, SoftCpu> {
    loop {
        if let Some(guard) = SOFT[cpu].try_lock() {
            return guard;
        }
        core::hint::spin_loop();
    }
}
const SOFT_SUPPORT: oskit_bts::hal::BtsSupport = oskit_bts::hal::BtsSupport {
    debug_store: true,
    dtes64: true,
    bts_enabled: true,
};

/// Accounts an overflow the crate handled (in the PMI or in a switch hook).
fn account(o: Overflow, cpu: usize, by: &str) {
    DRAINS.fetch_add(1, Ordering::Relaxed);
    PMI_DRAINED.fetch_add(o.drained, Ordering::Relaxed);
    TRUNCATED.fetch_add(o.truncated, Ordering::Relaxed);
    FULL_REPORTS.fetch_add(usize::from(o.full), Ordering::Relaxed);
    crate::trace!(
        "bts",
        "overflow handled by the {by} on cpu {cpu}: {} drained, {} truncated{}",
        o.drained,
        o.truncated,
        if o.full { ", buffer was full" } else { "" }
    );
}

/// The PMI handler: the crate's overflow handler on this CPU's software BTS unit. The crate
/// re-arms the LVT for every BTS interrupt (`Overflow`, `Late`); nothing else here uses the
/// PMI, so `NotBts` is only counted.
fn on_pmi(_frame: &mut TrapFrame) -> Handled {
    apic::eoi();
    let cpu = percpu::cpu_id();
    let mut soft = soft(cpu);
    soft.hw_mut().take_interrupt();
    let pmi = BTS.threshold_interrupt(&mut soft, &mut TraceSink, &mut NoSignals);
    drop(soft);
    NMIS_TAKEN.fetch_add(1, Ordering::Release);
    match pmi {
        Ok(Pmi::Overflow(o)) => account(o, cpu, "threshold interrupt"),
        Ok(Pmi::Late) => {
            LATE.fetch_add(1, Ordering::Relaxed);
            crate::trace!("bts", "late PMI on cpu {cpu}: handled at the switch-out");
        }
        Ok(Pmi::NotBts | Pmi::Deferred) | Err(_) => {
            SPURIOUS.fetch_add(1, Ordering::Relaxed);
            crate::trace!("bts", "PMI on cpu {cpu} not claimed by the tracer");
        }
    }
    Handled::Yes
}

/// Whether the software CPU's threshold interrupt is delivered as an NMI (second run).
static NMI_MODE: AtomicBool = AtomicBool::new(false);
/// NMIs that found the BTS state held. The task never holds its own CPU's state when it
/// raises the NMI, but after it moved it runs the old CPU's switch-out from its new CPU (this
/// kernel has no scheduler hooks), so a late NMI on the old CPU (as under a KVM that emulates
/// ring 0) can find that switch-out holding the state: the switch-out handles the overflow,
/// and the record checks below prove nothing was lost.
static DEFERRED: AtomicUsize = AtomicUsize::new(0);
/// Threshold interrupts (NMI or vector) the handlers have taken: the task waits for its own.
static NMIS_TAKEN: AtomicUsize = AtomicUsize::new(0);

/// The NMI handler (NMI delivery of the software PMI): the crate's NMI entry point, which
/// only tries this CPU's cell. Accounting and tracing are lock-free, so NMI-safe.
fn on_nmi(_frame: &mut TrapFrame) -> Handled {
    if !NMI_MODE.load(Ordering::Acquire) {
        return Handled::No;
    }
    let cpu = percpu::cpu_id();
    let pmi = BTS.nmi(&SOFT[cpu], &mut TraceSink, &mut NoSignals);
    NMIS_TAKEN.fetch_add(1, Ordering::Release);
    match pmi {
        Ok(Pmi::Overflow(o)) => account(o, cpu, "NMI"),
        Ok(Pmi::Late) => {
            LATE.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Pmi::Deferred) => {
            DEFERRED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Pmi::NotBts) | Err(_) => {
            SPURIOUS.fetch_add(1, Ordering::Relaxed);
        }
    }
    Handled::Yes
}

/// Runs a switch hook's result through the accounting (the CPUs are this tracer's only).
fn hook(r: Result<Option<Overflow>, BtsError>, cpu: usize) {
    match r {
        Ok(Some(o)) => account(o, cpu, "switch hook"),
        Ok(None) => {}
        Err(e) => {
            SPURIOUS.fetch_add(1, Ordering::Relaxed);
            crate::trace!("bts", "switch hook on cpu {cpu}: {e:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The traced code region.

/// One step of the traced region: a jump, a taken conditional branch, a call, its return and
/// a jump, really executed; returns each branch's source and target addresses.
#[inline(never)]
fn region_step() -> [(u64, u64); BRANCHES_PER_STEP] {
    let (jmp, jmp_to, jcc, jcc_to, call, callee, ret, ret_to, back, back_to): (
        u64,
        u64,
        u64,
        u64,
        u64,
        u64,
        u64,
        u64,
        u64,
        u64,
    );
    // SAFETY: only local control flow: every branch lands on a label of this block, the call
    // pushes a return address that the `ret` pops at once, and the `ud2`s are never reached.
    unsafe {
        asm!(
            "lea {jmp}, [rip + 2f]",
            "lea {jmp_to}, [rip + 3f]",
            "lea {jcc}, [rip + 4f]",
            "lea {jcc_to}, [rip + 5f]",
            "lea {call}, [rip + 6f]",
            "lea {callee}, [rip + 7f]",
            "lea {ret}, [rip + 7f]",
            "lea {ret_to}, [rip + 8f]",
            "lea {back}, [rip + 8f]",
            "lea {back_to}, [rip + 9f]",
            "2: jmp 3f",
            "ud2",
            "3: cmp {jmp}, {jmp}",
            "4: je 5f",
            "ud2",
            "5:",
            "6: call 7f",
            "8: jmp 9f",
            "7: ret",
            "9:",
            jmp = out(reg) jmp,
            jmp_to = out(reg) jmp_to,
            jcc = out(reg) jcc,
            jcc_to = out(reg) jcc_to,
            call = out(reg) call,
            callee = out(reg) callee,
            ret = out(reg) ret,
            ret_to = out(reg) ret_to,
            back = out(reg) back,
            back_to = out(reg) back_to,
        );
    }
    [
        (jmp, jmp_to),
        (jcc, jcc_to),
        (call, callee),
        (ret, ret_to),
        (back, back_to),
    ]
}

/// Whether `addr` lies in the region's code (its function is far smaller than 4 KiB).
fn in_region(addr: u64) -> bool {
    let start = region_step as fn() -> [(u64, u64); BRANCHES_PER_STEP] as usize as u64;
    (start..start + 4096).contains(&addr)
}

// ---------------------------------------------------------------------------------------------
// The traced task (software CPU path).

/// Set by the tracer once the context is configured.
static GO: AtomicBool = AtomicBool::new(false);
/// Emulated context switches (the task moved to another CPU).
static MOVES: AtomicUsize = AtomicUsize::new(0);

/// Runs the region `STEPS` times, feeding every branch to the software CPU it runs on.
fn traced_task(_: u64) -> i64 {
    while !GO.load(Ordering::Acquire) {
        sched::sleep_ticks(1);
    }
    let Some(id) = sched::current() else {
        return -1;
    };
    let me = KTask::new(id);
    let mut loaded_on: Option<usize> = None;
    for step in 0..STEPS {
        let irq = spin::irq_save();
        let cpu = percpu::cpu_id();
        if loaded_on != Some(cpu) {
            // The task moved: run the hooks the scheduler would have run at the switch.
            let now = apic::now_us();
            if let Some(old) = loaded_on {
                let r = BTS.switch_out(&mut soft(old), now, &mut TraceSink, &mut NoSignals);
                hook(r, old);
                SCHED_EXPECTED.fetch_add(1, Ordering::Relaxed);
                MOVES.fetch_add(1, Ordering::Relaxed);
            }
            let r = BTS.switch_in(&mut soft(cpu), &me, now, &mut TraceSink, &mut NoSignals);
            hook(r, cpu);
            SCHED_EXPECTED.fetch_add(1, Ordering::Relaxed);
            loaded_on = Some(cpu);
        }
        let branches = region_step();
        let mut soft = soft(cpu);
        let mut pmi = false;
        for (from, to) in branches {
            GENERATED.fetch_add(1, Ordering::AcqRel);
            if !(in_region(from) && in_region(to)) {
                OUTSIDE.fetch_add(1, Ordering::Relaxed);
            }
            let stored = match soft.hw_mut().branch(from, to, true) {
                Store::Stored => true,
                Store::Interrupt => {
                    pmi = true;
                    true
                }
                Store::Full => {
                    FULL.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Store::NotStored | Store::Fault => {
                    NOT_STORED.fetch_add(1, Ordering::Relaxed);
                    false
                }
            };
            if stored {
                // Interrupts are off: nothing drains between the store and this note.
                let k = STORED.fetch_add(1, Ordering::AcqRel);
                EXPECTED[k].0.store(from, Ordering::Release);
                EXPECTED[k].1.store(to, Ordering::Release);
            }
        }
        drop(soft);
        if pmi {
            // The software CPU delivered its threshold interrupt: raise it for real on this
            // CPU; at the PMI vector it is taken as soon as interrupts are on again, as an
            // NMI at once.
            PMIS.fetch_add(1, Ordering::Relaxed);
            let me = percpu::this_cpu().apic_id.load(Ordering::Relaxed);
            if NMI_MODE.load(Ordering::Acquire) {
                let taken = NMIS_TAKEN.load(Ordering::Acquire);
                apic::send_nmi(me);
                // On hardware a self-NMI is taken at once. A KVM that emulates ring 0 delivers
                // it late; taken while this task holds the software CPU's cell (feeding it the
                // next branches), it would find the state held and be deferred to a holder that
                // is no switch hook. Wait for it (bounded: 10 ms).
                let start = apic::now_us();
                while NMIS_TAKEN.load(Ordering::Acquire) == taken
                    && apic::now_us().saturating_sub(start) < 10_000
                {
                    core::hint::spin_loop();
                }
            } else {
                apic::send_ipi(me, PMI_VECTOR);
            }
        }
        let taken = NMIS_TAKEN.load(Ordering::Acquire);
        spin::irq_restore(irq);
        if pmi && !NMI_MODE.load(Ordering::Acquire) {
            // Taken as soon as interrupts are on, on hardware; late under a KVM that emulates
            // ring 0, while the next branches fill the buffer. Wait for it (bounded: 10 ms).
            let start = apic::now_us();
            while NMIS_TAKEN.load(Ordering::Acquire) == taken
                && apic::now_us().saturating_sub(start) < 10_000
            {
                core::hint::spin_loop();
            }
        }
        if step % 8 == 7 {
            // Sleep a tick: the task may wake up on another CPU.
            sched::sleep_ticks(1);
        }
    }
    // Switch-out for good: the task stops running traced code.
    let irq = spin::irq_save();
    if let Some(old) = loaded_on {
        let r = BTS.switch_out(
            &mut soft(old),
            apic::now_us(),
            &mut TraceSink,
            &mut NoSignals,
        );
        hook(r, old);
        SCHED_EXPECTED.fetch_add(1, Ordering::Relaxed);
    }
    spin::irq_restore(irq);
    0
}

fn reset_counters() {
    for c in [
        &TEARDOWNS,
        &TEARDOWN_RUNS,
        &TEARDOWN_OUTSIDE_WORKER,
        &QUEUE_FULL,
        &SIGNALS,
        &GENERATED,
        &STORED,
        &FULL,
        &NOT_STORED,
        &DRAINED,
        &MISMATCHED,
        &SCHED_DRAINED,
        &INVALID,
        &SCHED_EXPECTED,
        &DRAINS,
        &PMI_DRAINED,
        &TRUNCATED,
        &FULL_REPORTS,
        &LATE,
        &DEFERRED,
        &OUTSIDE,
        &SPURIOUS,
        &PMIS,
        &MOVES,
    ] {
        c.store(0, Ordering::Relaxed);
    }
    FIRST_MISMATCH.store(usize::MAX, Ordering::Relaxed);
    TEARDOWN_AT_US.store(0, Ordering::Relaxed);
    GO.store(false, Ordering::Relaxed);
}

/// Untraces `task` from an interrupts-off path and waits for the deferred teardown; checks it
/// ran exactly once, in the worker, after the untrace. Returns its latency in µs.
fn untrace_and_teardown(task: &KTask) -> Result<u64, checks::Failure> {
    let irq = spin::irq_save();
    let untraced_at = apic::now_us();
    let result = BTS.untrace(task);
    spin::irq_restore(irq);
    crate::trace!(
        "bts",
        "untraced {:#x} with interrupts off: {result:?}",
        task.pid()
    );
    if let Err(e) = result {
        fail!("untrace: {e:?}");
    }
    workqueue::flush();
    ensure!(
        TEARDOWNS.load(Ordering::Acquire) == 1,
        "{} teardowns after untrace and flush, not 1",
        TEARDOWNS.load(Ordering::Acquire)
    );
    // A later run of the work finds nothing more to tear down.
    run_teardown(0);
    ensure!(
        TEARDOWNS.load(Ordering::Acquire) == 1,
        "a second run tore down again"
    );
    ensure!(
        TEARDOWN_OUTSIDE_WORKER.load(Ordering::Relaxed) == 0,
        "the teardown did not run in kworker"
    );
    ensure!(
        QUEUE_FULL.load(Ordering::Relaxed) == 0,
        "the work queue was full"
    );
    let at = TEARDOWN_AT_US.load(Ordering::Acquire);
    ensure!(at >= untraced_at, "the teardown ran before the untrace");
    Ok(at - untraced_at)
}

/// The `bts` check.
pub fn bts() -> Outcome {
    // SAFETY: ring 0; the pointer is this CPU's xAPIC LVT PMI register (every CPU maps the
    // xAPIC page at the same address and each sees its own), written only by a re-arm, which
    // happens on the CPU the handle is used on.
    let lvt = LvtPmi::XApic(NonNull::new(XAPIC_LVT_PMI as *mut u32).expect("not null"));
    // SAFETY: ring 0 on this CPU; see above for the LVT pointer.
    let hw = unsafe { Cpu::new(PMI_VECTOR, lvt) };
    let support = hw.probe();
    reset_counters();
    let frames_before = frames::free_count();
    if support.usable() {
        println!("  bts: available: tracing a code region for real");
        crate::trace!("bts", "probe: BTS available ({support:?})");
        real_bts(hw)?;
    } else {
        println!("  bts: unavailable ({support:?}): the software CPU stands in");
        crate::trace!("bts", "probe: BTS unavailable; software CPU");
        // The PMI at a fixed vector, then delivered as an NMI.
        let fixed = soft_bts(false)?;
        reset_counters();
        let nmi = soft_bts(true)?;
        checks::figures(format_args!("soft CPU: {fixed}; as NMI: {nmi}"));
    }
    ensure!(
        BTS.contexts() == 0,
        "{} contexts left after the teardown",
        BTS.contexts()
    );
    ensure!(
        LOCKED_PAGES.load(Ordering::Acquire) == 0,
        "{} locked pages not refunded",
        LOCKED_PAGES.load(Ordering::Acquire)
    );
    ensure!(
        TASK_REFS.load(Ordering::Acquire) == 0 && ACCOUNT_REFS.load(Ordering::Acquire) == 0,
        "references left: {} on tasks, {} on the account",
        TASK_REFS.load(Ordering::Acquire),
        ACCOUNT_REFS.load(Ordering::Acquire)
    );
    let leaked = frames_before as i64 - frames::free_count() as i64;
    ensure!(leaked == 0, "{leaked} frames leaked");
    Ok(())
}

/// A run's key figures.
struct Figures {
    drained: usize,
    generated: usize,
    drains: usize,
    latency: u64,
}

impl core::fmt::Display for Figures {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{}/{} records, {} drains, teardown 1x {} us",
            self.drained, self.generated, self.drains, self.latency
        )
    }
}

/// The software-CPU run (see the module documentation), the PMI delivered at [`PMI_VECTOR`]
/// or, with `nmi`, as an NMI.
fn soft_bts(nmi: bool) -> Result<Figures, checks::Failure> {
    trap::set_handler(PMI_VECTOR, on_pmi);
    trap::set_handler(2, on_nmi);
    NMI_MODE.store(nmi, Ordering::Release);
    let Some(task) = sched::spawn("bts-traced", traced_task, 0) else {
        fail!("cannot start the traced task")
    };
    let traced = KTask::new(task);
    let account = Account::new();
    let cfg = Config {
        size: CAPACITY * core::mem::size_of::<oskit_bts::format::BtsRecord>(),
        // The task runs kernel code (CPL 0): recorded only with KERNEL.
        flags: Flags::TRACE | Flags::KERNEL | Flags::ALLOC | Flags::INTERRUPT | Flags::SCHED,
        signal: 0,
    };
    let configured = BTS.config(&traced, &account, cfg);
    drop(account);
    let status = BTS.status(&traced);
    crate::trace!(
        "bts",
        "config {:#x}: {configured:?}, {status:?}",
        traced.pid()
    );
    GO.store(true, Ordering::Release);
    let exit = sched::join(task);
    if let Err(e) = configured {
        fail!("config: {e:?}");
    }
    ensure!(exit == Some(0), "the traced task ended with {exit:?}");
    // The tracer drains what stayed below the threshold (PTRACE_BTS_DRAIN).
    let left = BTS.size(&traced);
    let mut out = [Record::Invalid; CAPACITY];
    let final_drain = match BTS.drain(&traced, &mut out) {
        Ok(n) => n,
        Err(e) => fail!("final drain: {e:?} (size {left:?})"),
    };
    for r in &out[..final_drain] {
        TraceSink.push(traced.pid(), *r);
    }
    crate::trace!("bts", "tracer drained the last {final_drain} records");
    let latency = untrace_and_teardown(&traced)?;
    ensure!(
        BTS.size(&traced) == Err(BtsError::NoSuchContext),
        "the context answers after the untrace"
    );
    drop(traced);

    let (generated, stored, full, off) = (
        GENERATED.load(Ordering::Acquire),
        STORED.load(Ordering::Acquire),
        FULL.load(Ordering::Acquire),
        NOT_STORED.load(Ordering::Acquire),
    );
    let (drained, truncated) = (
        DRAINED.load(Ordering::Acquire),
        TRUNCATED.load(Ordering::Acquire),
    );
    let drains = DRAINS.load(Ordering::Acquire);
    ensure!(
        generated == MAX_BRANCHES,
        "{generated} branches, not {MAX_BRANCHES}"
    );
    ensure!(
        OUTSIDE.load(Ordering::Relaxed) == 0,
        "a branch address lies outside the traced region"
    );
    ensure!(
        off == 0,
        "{off} branches not stored (tracing was off on the CPU)"
    );
    ensure!(
        stored + full == generated,
        "{stored} stored + {full} refused != {generated} generated"
    );
    ensure!(
        drained + truncated == stored,
        "{drained} drained + {truncated} truncated != {stored} stored"
    );
    ensure!(
        MISMATCHED.load(Ordering::Relaxed) == 0,
        "{} drained records differ from the branches made (order or content), the first at \
         {}; {generated} made, {stored} stored, {full} refused, {drained} drained, {drains} \
         overflows",
        MISMATCHED.load(Ordering::Relaxed),
        FIRST_MISMATCH.load(Ordering::Relaxed)
    );
    let sched_records = SCHED_DRAINED.load(Ordering::Relaxed);
    let by_pmi = PMI_DRAINED.load(Ordering::Relaxed);
    ensure!(
        drains > 0 && by_pmi + final_drain == drained + sched_records,
        "{drains} threshold interrupts drained {by_pmi} records, the tracer {final_drain}: not \
         the {drained} branches + {sched_records} SCHED records seen"
    );
    ensure!(
        sched_records == SCHED_EXPECTED.load(Ordering::Relaxed),
        "{sched_records} SCHED records drained, {} written by the hooks",
        SCHED_EXPECTED.load(Ordering::Relaxed)
    );
    ensure!(
        SPURIOUS.load(Ordering::Relaxed) == 0,
        "{} PMIs or hook calls the tracer did not claim",
        SPURIOUS.load(Ordering::Relaxed)
    );
    ensure!(
        INVALID.load(Ordering::Relaxed) == 0 && SIGNALS.load(Ordering::Relaxed) == 0,
        "{} invalid records, {} signals",
        INVALID.load(Ordering::Relaxed),
        SIGNALS.load(Ordering::Relaxed)
    );
    let lost = full + truncated;
    println!(
        "  {}: {generated} branches of the region, {stored} stored: {} records drained ({by_pmi} \
         by {drains} overflows ({} PMIs, {} late), {final_drain} by the tracer) = {drained} \
         branches in order + {sched_records} SCHED records; {lost} lost ({full} refused by a \
         full buffer); {} moves between CPUs; {} NMIs deferred to a switch hook",
        if nmi { "PMI as NMI" } else { "PMI at a vector" },
        by_pmi + final_drain,
        PMIS.load(Ordering::Relaxed),
        LATE.load(Ordering::Relaxed),
        MOVES.load(Ordering::Relaxed),
        DEFERRED.load(Ordering::Relaxed)
    );
    println!(
        "  untraced with interrupts off; teardown ran once in kworker {latency} us later; \
         locked pages and frames back"
    );
    Ok(Figures {
        drained,
        generated,
        drains,
        latency,
    })
}

/// Traces a code region of this task on the real CPU (circular buffer), drains it into the
/// trace buffer, then untraces with interrupts off. Only where the CPU offers BTS.
fn real_bts(mut hw: Cpu) -> Outcome {
    let Some(task) = sched::current() else {
        fail!("not in a task")
    };
    let me = KTask::new(task);
    let account = Account::new();
    let cfg = Config {
        size: CAPACITY * core::mem::size_of::<oskit_bts::format::BtsRecord>(),
        // The traced region is kernel code: recorded only with KERNEL.
        flags: Flags::TRACE | Flags::KERNEL | Flags::ALLOC,
        signal: 0,
    };
    let configured = BTS.config(&me, &account, cfg);
    drop(account);
    if let Err(e) = configured {
        fail!("config: {e:?}");
    }
    // Interrupts off: the task stays on this CPU, whose registers `hw` programs.
    let irq = spin::irq_save();
    let mut cpu = BtsCpu::new(&mut hw);
    let sw_in = BTS.switch_in(
        &mut cpu,
        &me,
        apic::now_us(),
        &mut TraceSink,
        &mut NoSignals,
    );
    for _ in 0..4 {
        core::hint::black_box(region_step());
    }
    let sw_out = BTS.switch_out(&mut cpu, apic::now_us(), &mut TraceSink, &mut NoSignals);
    spin::irq_restore(irq);
    if let Err(e) = sw_in.and(sw_out) {
        fail!("switch hooks: {e:?}");
    }
    let mut out = [Record::Invalid; CAPACITY];
    let n = match BTS.drain(&me, &mut out) {
        Ok(n) => n,
        Err(e) => fail!("drain: {e:?}"),
    };
    let mut in_region_records = 0;
    for r in &out[..n] {
        if let Record::Branch { from, to, .. } = *r {
            crate::trace!("bts", "from={from:#x} to={to:#x}");
            in_region_records += usize::from(in_region(from) && in_region(to));
        }
    }
    let latency = untrace_and_teardown(&me)?;
    drop(me);
    ensure!(
        in_region_records >= 4 * BRANCHES_PER_STEP,
        "{n} records, {in_region_records} of them in the traced region"
    );
    checks::figures(format_args!(
        "real BTS: {n} records ({in_region_records} in the region), teardown 1x {latency} us"
    ));
    Ok(())
}
