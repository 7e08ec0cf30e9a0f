//! Scenario step `apf`: KVM asynchronous page faults with `oskit-pv-apf`.
//!
//! The #PF handler calls the crate's hook first (`fault::set_hook`), and the page-ready vector's
//! handler runs the crate's `handle_ready_interrupt`. This file is the kernel's glue, the same
//! for both hosts: the scheduler as the crate sees it, the per-CPU areas the host writes, what
//! happened (counters, and each task's sleeps and wakes, counted by the task), the hook and the
//! page-ready handler, and the enable on each CPU. Which host plays KVM:
//!
//! - [`real`]: this machine's KVM, when it offers async-PF-int: the `apf` check enables it on
//!   every CPU, waits and reports; `scenario=apf-real` has ring-3 tasks sweep memory the host
//!   evicts, for real "not present" and "page ready" events;
//! - [`model`]: otherwise the crate's host model (`sim::SimHost`), driven from the timer
//!   interrupt, in three phases that each end with every sleeper woken exactly once.

mod model;
mod real;

pub use real::apf_real;

use core::{
    arch::global_asm,
    sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicUsize, Ordering},
};

use oskit_pv_apf::{
    ApfCpu, AsyncEvent, AsyncPf, Config, KvmFeatures, Scheduler, Wake,
    sim::{SimHost, SimVcpu},
};

use crate::{
    arch::apic,
    arch::gdt::MAX_CPUS,
    arch::percpu,
    arch::trap::{self, Handled, TrapFrame},
    checks::Outcome,
    ensure, println, spin,
    task::sched::{self, TaskId},
};

/// The page-ready vector.
const APF_VECTOR: u8 = 0xec;
/// Tokens of a run.
const MAX_TOKENS: usize = 32;

// ---------------------------------------------------------------------------------------------
// The kernel's scheduler as the crate sees it.

static BLOCKS: AtomicUsize = AtomicUsize::new(0);
static UNBLOCKS: AtomicUsize = AtomicUsize::new(0);
/// Per task slot (the low 16 bits of a pid): wakes the task received from the crate, and
/// sleeps it ended in the #PF. Each sleep must end with exactly one wake.
static WAKES_OF: [AtomicU32; sched::MAX_TASKS] = [const { AtomicU32::new(0) }; sched::MAX_TASKS];
static SLEEPS_OF: [AtomicU32; sched::MAX_TASKS] = [const { AtomicU32::new(0) }; sched::MAX_TASKS];
/// `scenario=apf-double-wake`: the scheduler glue wakes every task twice (a deliberate bug the
/// check must catch).
static DOUBLE_WAKE: AtomicBool = AtomicBool::new(false);

fn slot_of(task: TaskId) -> usize {
    (task.pid() & 0xffff) as usize
}

struct KSched;

impl Scheduler for KSched {
    type Task = TaskId;
    fn current_task(&self) -> TaskId {
        sched::current().expect("current_task is only asked when can_sleep said yes")
    }
    fn current_cpu(&self) -> u32 {
        percpu::cpu_id() as u32
    }
    fn can_sleep(&self) -> bool {
        sched::current().is_some()
    }
    fn block(&self) {
        BLOCKS.fetch_add(1, Ordering::Relaxed);
        sched::block_current();
    }
    fn unblock(&self, task: TaskId) {
        UNBLOCKS.fetch_add(1, Ordering::Relaxed);
        let times = if DOUBLE_WAKE.load(Ordering::Relaxed) {
            2
        } else {
            1
        };
        for _ in 0..times {
            if sched::unblock(task)
                && let Some(w) = WAKES_OF.get(slot_of(task))
            {
                w.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    fn halt(&self) {
        // SAFETY: ring 0, called by the crate with interrupts off from a context that may take
        // interrupts (no spinlock held: the crate releases its bucket lock first).
        unsafe { oskit_pv_apf::x86::halt_with_interrupts() };
    }
    fn kick(&self, cpu: u32) {
        if (cpu as usize) < MAX_CPUS {
            apic::send_reschedule(percpu::cpu(cpu as usize).apic_id.load(Ordering::Relaxed));
        }
    }
}

/// The per-CPU state (the 64-byte areas the host writes), for the real or the modelled host.
static APF_CPU: [ApfCpu; MAX_CPUS] = [const { ApfCpu::new() }; MAX_CPUS];
/// The guest side on the real CPU (KVM).
static APF_REAL: AsyncPf<oskit_pv_apf::x86::Cpu, KSched> = AsyncPf::new(KSched);
/// The host model, and the guest side driven by it.
static HOST: SimHost<MAX_CPUS> = SimHost::modern();
static APF_SIM: AsyncPf<SimVcpu<'static, MAX_CPUS>, KSched> = AsyncPf::new(KSched);

/// Which guest side the hook and the page-ready handler use.
static MODE: AtomicU8 = AtomicU8::new(OFF);
const OFF: u8 = 0;
const REAL: u8 = 1;
const SIM: u8 = 2;

fn real_cpu() -> oskit_pv_apf::x86::Cpu {
    // SAFETY: ring 0, and only used in REAL mode, which is entered only after the probe found
    // KVM with async PF (its MSRs exist).
    unsafe { oskit_pv_apf::x86::Cpu::new() }
}

// ---------------------------------------------------------------------------------------------
// What happened.

static SLEPT: AtomicUsize = AtomicUsize::new(0);
static CAME_FIRST: AtomicUsize = AtomicUsize::new(0);
static WOKEN: AtomicUsize = AtomicUsize::new(0);
static DUMMIES_ADDED: AtomicUsize = AtomicUsize::new(0);
static DUPLICATES: AtomicUsize = AtomicUsize::new(0);
static DROPPED: AtomicUsize = AtomicUsize::new(0);
static WAKE_ALLS: AtomicUsize = AtomicUsize::new(0);
static WOKEN_BY_ALL: AtomicUsize = AtomicUsize::new(0);
static DUMMIES_FREED: AtomicUsize = AtomicUsize::new(0);
static UNEXPECTED: AtomicUsize = AtomicUsize::new(0);
static RETURNED_EARLY: AtomicUsize = AtomicUsize::new(0);
static READY_IRQS: AtomicUsize = AtomicUsize::new(0);
static SPURIOUS: AtomicUsize = AtomicUsize::new(0);
static ERRORS: AtomicUsize = AtomicUsize::new(0);
/// Faults of the touching instruction the crate did not claim.
static UNCLAIMED: AtomicUsize = AtomicUsize::new(0);
/// Not-presents injected.
static INJECTED: AtomicUsize = AtomicUsize::new(0);
/// Per token: times its fault returned, and how (1 slept, 2 the wake came first).
static RETURNS: [AtomicU32; MAX_TOKENS] = [const { AtomicU32::new(0) }; MAX_TOKENS];
static HOW: [AtomicU8; MAX_TOKENS] = [const { AtomicU8::new(0) }; MAX_TOKENS];

fn record(event: AsyncEvent, token: u32) {
    let cpu = percpu::cpu_id();
    match event {
        AsyncEvent::Slept => {
            SLEPT.fetch_add(1, Ordering::Relaxed);
            if let Some(task) = sched::current()
                && let Some(s) = SLEEPS_OF.get(slot_of(task))
            {
                s.fetch_add(1, Ordering::Relaxed);
            }
            crate::trace!(
                "apf",
                "token {token:#x}: slept in the #PF, woken, on cpu {cpu}"
            );
        }
        AsyncEvent::WakeCameFirst => {
            CAME_FIRST.fetch_add(1, Ordering::Relaxed);
            crate::trace!("apf", "token {token:#x}: its wake came first, no sleep");
        }
        AsyncEvent::Woke(wake) => {
            let counter = match wake {
                Wake::Woke(n) => {
                    WOKEN.fetch_add(n, Ordering::Relaxed);
                    None
                }
                Wake::DummyAdded => Some(&DUMMIES_ADDED),
                Wake::AlreadyPending => Some(&DUPLICATES),
                Wake::Dropped => Some(&DROPPED),
            };
            if let Some(c) = counter {
                c.fetch_add(1, Ordering::Relaxed);
            }
            crate::trace!("apf", "page ready on cpu {cpu}: {wake:?}");
        }
        AsyncEvent::WokeAll(all) => {
            WAKE_ALLS.fetch_add(1, Ordering::Relaxed);
            WOKEN_BY_ALL.fetch_add(all.woken, Ordering::Relaxed);
            DUMMIES_FREED.fetch_add(all.dummies_freed, Ordering::Relaxed);
            crate::trace!("apf", "wake-all on cpu {cpu}: {all:?}");
        }
        AsyncEvent::ReturnedEarly => {
            RETURNED_EARLY.fetch_add(1, Ordering::Relaxed);
            crate::trace!("apf", "token {token:#x}: a wake was lost, returned early");
        }
        AsyncEvent::Unexpected(flags) => {
            UNEXPECTED.fetch_add(1, Ordering::Relaxed);
            crate::trace!("apf", "unexpected flags {flags:#x} on cpu {cpu}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The #PF hook and the page-ready interrupt.

global_asm!(
    ".global oskit_apf_touch",
    ".global oskit_apf_touch_end",
    "oskit_apf_touch:",
    "mov rax, qword ptr [rdi]",
    "oskit_apf_touch_end:",
    "ret",
);

unsafe extern "C" {
    /// Reads the word at `addr` (the instruction a modelled not-present interrupts).
    fn oskit_apf_touch(addr: u64) -> u64;
    static oskit_apf_touch_end: u8;
}

fn touch_rip() -> u64 {
    oskit_apf_touch as unsafe extern "C" fn(u64) -> u64 as usize as u64
}

/// Runs first in the #PF handler.
fn apf_hook(frame: &mut TrapFrame, cr2: u64) -> Handled {
    let cpu = percpu::cpu_id();
    let outcome = match MODE.load(Ordering::Acquire) {
        REAL => APF_REAL.handle_page_fault_event(&APF_CPU[cpu], cr2),
        SIM => APF_SIM.handle_page_fault_event(&APF_CPU[cpu], cr2),
        _ => None,
    };
    let ours = frame.rip == touch_rip();
    match outcome {
        Some(event) => {
            record(event, cr2 as u32);
            if ours {
                let seq = ((cr2 as u32) >> 12) as usize;
                if let Some(i) = seq.checked_sub(1).filter(|&i| i < MAX_TOKENS) {
                    let how = match event {
                        AsyncEvent::Slept => 1,
                        AsyncEvent::WakeCameFirst => 2,
                        _ => 3,
                    };
                    HOW[i].store(how, Ordering::Relaxed);
                    RETURNS[i].fetch_add(1, Ordering::AcqRel);
                }
                // The host has the page in: the access completes.
                frame.rip = &raw const oskit_apf_touch_end as u64;
            }
            Handled::Yes
        }
        None if ours => {
            // The model's not-present was not seen: skip the access rather than die.
            UNCLAIMED.fetch_add(1, Ordering::Relaxed);
            frame.rip = &raw const oskit_apf_touch_end as u64;
            Handled::Yes
        }
        None => Handled::No,
    }
}

/// The page-ready vector's handler.
fn on_page_ready(_frame: &mut TrapFrame) -> Handled {
    apic::eoi();
    let cpu = percpu::cpu_id();
    let result = match MODE.load(Ordering::Acquire) {
        REAL => APF_REAL
            .handle_ready_interrupt(&real_cpu(), &APF_CPU[cpu])
            .map_err(|_| ()),
        SIM => APF_SIM
            .handle_ready_interrupt(&HOST.vcpu(cpu), &APF_CPU[cpu])
            .map_err(|_| ()),
        _ => Ok(None),
    };
    match result {
        Ok(Some(event)) => {
            READY_IRQS.fetch_add(1, Ordering::Relaxed);
            record(event, 0);
        }
        Ok(None) => {
            SPURIOUS.fetch_add(1, Ordering::Relaxed);
        }
        Err(()) => {
            ERRORS.fetch_add(1, Ordering::Relaxed);
        }
    }
    Handled::Yes
}
// ---------------------------------------------------------------------------------------------
// Enabling per CPU.

static ENABLED: AtomicUsize = AtomicUsize::new(0);
static ENABLE_FAILED: AtomicUsize = AtomicUsize::new(0);

fn area_phys(cpu: usize) -> u64 {
    // The kernel image is identity-mapped: a static's address is its physical address.
    APF_CPU[cpu].area_addr() as u64
}

/// The guest side's configuration, for both hosts.
fn config() -> Config {
    Config {
        allow_page_fault_protocol: false,
        // Kernel-mode faults may sleep here (the not presents hit kernel tasks).
        send_always: true,
        ..Config::new(APF_VECTOR)
    }
}

fn enable_real(cpu: usize) {
    let irq = spin::irq_save();
    // SAFETY: APF_CPU is static and identity-mapped (its address is its physical address);
    // interrupts are off; this runs on `cpu`; REAL mode is only entered under KVM.
    let r = unsafe { APF_REAL.enable_cpu(&real_cpu(), &APF_CPU[cpu], area_phys(cpu), config()) };
    spin::irq_restore(irq);
    match r {
        Ok(_) => ENABLED.fetch_add(1, Ordering::Relaxed),
        Err(_) => ENABLE_FAILED.fetch_add(1, Ordering::Relaxed),
    };
}

fn disable_real(cpu: usize) {
    // Interrupts stay on: a pending page ready is still delivered and finds the CPU disabled.
    if APF_REAL.disable_cpu(&real_cpu(), &APF_CPU[cpu]).is_err() {
        ENABLE_FAILED.fetch_add(1, Ordering::Relaxed);
    }
    APF_REAL.wake_all_of(cpu as u32);
}

fn reset() {
    for c in [
        &BLOCKS,
        &UNBLOCKS,
        &SLEPT,
        &CAME_FIRST,
        &WOKEN,
        &DUMMIES_ADDED,
        &DUPLICATES,
        &DROPPED,
        &WAKE_ALLS,
        &WOKEN_BY_ALL,
        &DUMMIES_FREED,
        &UNEXPECTED,
        &RETURNED_EARLY,
        &READY_IRQS,
        &SPURIOUS,
        &ERRORS,
        &UNCLAIMED,
        &INJECTED,
        &ENABLED,
        &ENABLE_FAILED,
    ] {
        c.store(0, Ordering::Relaxed);
    }
    RETURNS.iter().for_each(|r| r.store(0, Ordering::Relaxed));
    WAKES_OF.iter().for_each(|w| w.store(0, Ordering::Relaxed));
    SLEEPS_OF.iter().for_each(|s| s.store(0, Ordering::Relaxed));
    HOW.iter().for_each(|h| h.store(0, Ordering::Relaxed));
    model::reset();
}
// ---------------------------------------------------------------------------------------------
// The check.

/// The `apf` check.
pub fn apf() -> Outcome {
    reset();
    trap::set_handler(APF_VECTOR, on_page_ready);
    match oskit_pv_apf::x86::probe() {
        Some(f) if f.has(KvmFeatures::ASYNC_PF_INT) => real::real_apf(f),
        Some(f) => {
            println!("  kvm: yes, but async-PF-int not offered ({f:?}): the host model stands in");
            crate::trace!("apf", "KVM without async-PF-int; host model");
            model::sim_apf()
        }
        None => {
            println!("  not KVM: the host model stands in");
            crate::trace!("apf", "not KVM; host model");
            model::sim_apf()
        }
    }
}

/// Every task was woken exactly once per sleep in the #PF (a duplicate or a missing wake
/// fails), counted by the task that received it, not by the calls the crate made.
fn each_task_woken_once_per_sleep() -> Outcome {
    for slot in 0..sched::MAX_TASKS {
        let wakes = WAKES_OF[slot].load(Ordering::Relaxed);
        let sleeps = SLEEPS_OF[slot].load(Ordering::Relaxed);
        ensure!(
            wakes == sleeps,
            "task slot {slot} woken {wakes} times for {sleeps} sleeps in the #PF"
        );
    }
    Ok(())
}

/// `scenario=apf-double-wake`: the `apf` check with scheduler glue that wakes every sleeper
/// twice. It must fail (`cargo xtask test` checks that it turns the run red).
pub fn apf_double_wake() -> Outcome {
    DOUBLE_WAKE.store(true, Ordering::Relaxed);
    let outcome = apf();
    DOUBLE_WAKE.store(false, Ordering::Relaxed);
    outcome
}
