//! Scenario step `apf`: KVM asynchronous page faults with `oskit-pv-apf`.
//!
//! The #PF handler calls the crate's hook first (`fault::set_hook`). Under KVM offering
//! async-PF-int the check enables it for real on every CPU (`smp::on_each_cpu`, through the
//! MSRs of `x86::Cpu`), waits, reports whether the host delivered events, and disables it (this
//! path is only compiled here: the machine's KVM cannot run the guest, and TCG is not KVM).
//!
//! Otherwise the crate's host model (`sim::SimHost`, interrupt protocol) plays KVM, driven from
//! the timer interrupt (`apic::add_tick_hook`) on each CPU:
//!
//! - *not present*: when the tick interrupts one of the worker tasks, the model writes the
//!   flags into that CPU's area and the kernel delivers the #PF for real: the tick touches an
//!   unmapped address whose low 32 bits are the token (KVM puts the token in CR2). The kernel's
//!   #PF handler runs the hook, the crate puts the worker to sleep on the token
//!   (`sched::block_current`, inside the fault), and once woken the hook resumes after the
//!   touching instruction (the host has the page in);
//! - *page ready*: a few ticks later the model puts the token in the area, and the kernel raises
//!   the page-ready vector on that CPU (a self-IPI); its handler runs the crate's
//!   `handle_ready_interrupt`, which wakes the sleeper (`sched::unblock`) and ACKs by MSR.
//!
//! Three phases: sleeps and wakes; wakes that arrive before their wait (a dummy entry, consumed
//! by the wait, which returns at once); and a wake-all per CPU (with a stray wake whose fault
//! never comes, so the wake-all also frees a dummy). Verified: every injected fault returned
//! exactly once, every sleeper was unblocked exactly once, no dummy or waiter is left.

use core::{
    arch::global_asm,
    sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering},
};

use oskit_pv_apf::{
    ApfCpu, AsyncEvent, AsyncPf, Config, KvmFeatures, Protocol, Scheduler, Wake,
    sim::{Inject, SimHost, SimVcpu},
};

use crate::{
    arch::apic,
    arch::gdt::MAX_CPUS,
    arch::percpu,
    arch::smp,
    arch::trap::{self, Handled, TrapFrame},
    checks::{self, Outcome},
    ensure, fail,
    mm::fault,
    mm::{frames, vm},
    println, spin,
    spin::SpinLock,
    task::sched::{self, TaskId},
    task::usermode,
};

/// The page-ready vector.
const APF_VECTOR: u8 = 0xec;
/// Unmapped kernel addresses whose low 32 bits carry a token (320 GiB: nothing is mapped
/// there; the kernel stacks are at 256 GiB, user space starts at 512 GiB).
const TOKEN_WINDOW: u64 = 320 << 30;
/// Ticks the model takes to bring a page in.
const READY_DELAY: u64 = 3;
/// Tokens of a run.
const MAX_TOKENS: usize = 32;
/// Worker tasks at most (one more than the CPUs plus the wake-all sleepers).
const MAX_WORKERS: usize = MAX_CPUS + 2;
/// Ticks a phase may take.
const PHASE_TICKS: u64 = 600;

/// Sleeps and wakes; wakes before waits. (The waits ended by a wake-all are one more than
/// the CPUs: every worker but one sleeps.)
const NORMAL: usize = 8;
const EARLY: usize = 4;

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
// The host model's plan, run from the timer interrupt.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Not present, then page ready a few ticks later.
    Normal,
    /// Page ready first, then not present on the same CPU.
    Early,
    /// Not present, ended by a wake-all.
    ForAll,
    /// Page ready for a fault that never comes (a dummy the wake-all frees).
    Stray,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Page ready is due first.
    ReadyFirst,
    /// Not present is due (on any CPU running a worker, or on `vcpu` for `Early`).
    ToInject,
    /// Not present delivered; page ready due at `at` (`Normal`).
    Injected,
    /// Nothing more to send.
    Done,
}

#[derive(Debug, Clone, Copy)]
struct Tok {
    kind: Kind,
    st: St,
    vcpu: usize,
    at: u64,
}

struct Plan {
    toks: [Tok; MAX_TOKENS],
    len: usize,
    wake_all: [bool; MAX_CPUS],
}

static PLAN: SpinLock<Plan> = SpinLock::new(Plan {
    toks: [Tok {
        kind: Kind::Normal,
        st: St::Done,
        vcpu: usize::MAX,
        at: 0,
    }; MAX_TOKENS],
    len: 0,
    wake_all: [false; MAX_CPUS],
});

enum Action {
    Ready(usize),
    WakeAll,
    NotPresent(usize),
}

/// Token `i`: KVM-like, a sequence number above the low 12 bits.
fn token(i: usize) -> u32 {
    ((i as u32 + 1) << 12) | 0xa
}

impl Plan {
    fn add(&mut self, kind: Kind, vcpu: usize, now: u64) -> Option<usize> {
        let i = self.len;
        let st = match kind {
            Kind::Normal | Kind::ForAll => St::ToInject,
            Kind::Early | Kind::Stray => St::ReadyFirst,
        };
        *self.toks.get_mut(i)? = Tok {
            kind,
            st,
            vcpu,
            at: now,
        };
        self.len += 1;
        Some(i)
    }

    /// What the host does on `cpu`'s tick: a due page ready first, then a wake-all, then a
    /// not present if a worker is running.
    fn next(&mut self, cpu: usize, now: u64, worker: bool) -> Option<Action> {
        for (i, t) in self.toks[..self.len].iter_mut().enumerate() {
            if t.vcpu != cpu {
                continue;
            }
            match (t.kind, t.st) {
                (Kind::Normal, St::Injected) if now >= t.at => {
                    t.st = St::Done;
                    return Some(Action::Ready(i));
                }
                (Kind::Early, St::ReadyFirst) => {
                    t.st = St::ToInject;
                    t.at = now + 2;
                    return Some(Action::Ready(i));
                }
                (Kind::Stray, St::ReadyFirst) => {
                    t.st = St::Done;
                    return Some(Action::Ready(i));
                }
                _ => {}
            }
        }
        if core::mem::take(&mut self.wake_all[cpu]) {
            return Some(Action::WakeAll);
        }
        if !worker {
            return None;
        }
        for (i, t) in self.toks[..self.len].iter_mut().enumerate() {
            let here = t.kind != Kind::Early || t.vcpu == cpu;
            if t.st == St::ToInject && now >= t.at && here {
                t.vcpu = cpu;
                t.st = St::Injected;
                t.at = now + READY_DELAY;
                return Some(Action::NotPresent(i));
            }
        }
        None
    }

    /// The host's token slot was busy: send it again on a later tick.
    fn undo_ready(&mut self, i: usize) {
        let t = &mut self.toks[i];
        t.st = match t.kind {
            Kind::Normal => St::Injected,
            Kind::Early | Kind::Stray => St::ReadyFirst,
            Kind::ForAll => t.st,
        };
    }
}

/// Worker tasks (pids; 0: none) the host may interrupt with a not present.
static WORKERS: [AtomicU64; MAX_WORKERS] = [const { AtomicU64::new(0) }; MAX_WORKERS];
static STOP: AtomicBool = AtomicBool::new(false);

fn is_worker(task: TaskId) -> bool {
    WORKERS
        .iter()
        .any(|w| w.load(Ordering::Acquire) == task.pid())
}

fn raise_page_ready(cpu: usize, inject: Inject) {
    match inject {
        Inject::Interrupt { vector } => {
            apic::send_ipi(percpu::cpu(cpu).apic_id.load(Ordering::Relaxed), vector)
        }
        Inject::PageFault { .. } => {
            ERRORS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Delivers the model's not present for token `i` to the task this tick interrupted.
fn inject_not_present(cpu: usize, i: usize) {
    let t = token(i);
    match HOST.not_present(cpu, &APF_CPU[cpu], t) {
        Ok(Inject::PageFault { cr2 }) => {
            INJECTED.fetch_add(1, Ordering::Relaxed);
            crate::trace!("apf", "host: token {t:#x} not present on cpu {cpu}");
            // SAFETY: TOKEN_WINDOW + cr2 is unmapped: the read faults, and the #PF hook ends
            // it (after the wait) by resuming after the read; nothing is read.
            unsafe { oskit_apf_touch(TOKEN_WINDOW + cr2) };
            if RETURNS[i].load(Ordering::Acquire) == 0 {
                // No fault happened (the window was mapped?): the flags must not linger.
                APF_CPU[cpu].area().flags.store(0, Ordering::Relaxed);
                UNCLAIMED.fetch_add(1, Ordering::Relaxed);
            }
        }
        _ => {
            ERRORS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The host model, on every tick of every CPU.
fn host_tick(_: usize) {
    let cpu = percpu::cpu_id();
    let now = sched::ticks();
    let worker = sched::current().is_some_and(is_worker);
    let Some(action) = PLAN.lock().next(cpu, now, worker) else {
        return;
    };
    match action {
        Action::Ready(i) => match HOST.page_ready(cpu, &APF_CPU[cpu], token(i)) {
            Ok(inject) => {
                crate::trace!("apf", "host: token {:#x} ready on cpu {cpu}", token(i));
                raise_page_ready(cpu, inject);
            }
            Err(oskit_pv_apf::sim::SimError::SlotBusy) => PLAN.lock().undo_ready(i),
            Err(_) => {
                ERRORS.fetch_add(1, Ordering::Relaxed);
            }
        },
        Action::WakeAll => match HOST.wake_all(cpu, &APF_CPU[cpu]) {
            Ok(inject) => {
                crate::trace!("apf", "host: wake-all on cpu {cpu}");
                raise_page_ready(cpu, inject);
            }
            Err(oskit_pv_apf::sim::SimError::SlotBusy) => PLAN.lock().wake_all[cpu] = true,
            Err(_) => {
                ERRORS.fetch_add(1, Ordering::Relaxed);
            }
        },
        Action::NotPresent(i) => inject_not_present(cpu, i),
    }
}

fn worker(_: u64) -> i64 {
    let mut spins = 0i64;
    while !STOP.load(Ordering::Acquire) {
        spins += 1;
        core::hint::spin_loop();
    }
    spins
}

// ---------------------------------------------------------------------------------------------
// Enabling per CPU.

static ENABLED: AtomicUsize = AtomicUsize::new(0);
static ENABLE_FAILED: AtomicUsize = AtomicUsize::new(0);

fn area_phys(cpu: usize) -> u64 {
    // The kernel image is identity-mapped: a static's address is its physical address.
    APF_CPU[cpu].area_addr() as u64
}

fn sim_config() -> Config {
    Config {
        allow_page_fault_protocol: false,
        // Kernel-mode faults may sleep here (the not presents hit kernel tasks).
        send_always: true,
        ..Config::new(APF_VECTOR)
    }
}

fn enable_sim(cpu: usize) {
    let irq = spin::irq_save();
    // SAFETY: APF_CPU is static; in the model the area's physical address is its address;
    // interrupts are off; this runs on `cpu`.
    let r =
        unsafe { APF_SIM.enable_cpu(&HOST.vcpu(cpu), &APF_CPU[cpu], area_phys(cpu), sim_config()) };
    spin::irq_restore(irq);
    match r {
        Ok(Protocol::Interrupt { .. }) => ENABLED.fetch_add(1, Ordering::Relaxed),
        _ => ENABLE_FAILED.fetch_add(1, Ordering::Relaxed),
    };
    // Like KVM, the model answers the enable with a wake-all of the CPU.
    if let Ok(Some(inject)) = HOST.deliver_queued(cpu, &APF_CPU[cpu]) {
        raise_page_ready(cpu, inject);
    }
}

fn disable_sim(cpu: usize) {
    if APF_SIM.disable_cpu(&HOST.vcpu(cpu), &APF_CPU[cpu]).is_err() {
        ENABLE_FAILED.fetch_add(1, Ordering::Relaxed);
    }
}

fn enable_real(cpu: usize) {
    let irq = spin::irq_save();
    // SAFETY: APF_CPU is static and identity-mapped (its address is its physical address);
    // interrupts are off; this runs on `cpu`; REAL mode is only entered under KVM.
    let r =
        unsafe { APF_REAL.enable_cpu(&real_cpu(), &APF_CPU[cpu], area_phys(cpu), sim_config()) };
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
    let mut plan = PLAN.lock();
    plan.len = 0;
    plan.wake_all = [false; MAX_CPUS];
    drop(plan);
    STOP.store(false, Ordering::Relaxed);
    WORKERS.iter().for_each(|w| w.store(0, Ordering::Relaxed));
}

// ---------------------------------------------------------------------------------------------
// The check.

/// The `apf` check.
pub fn apf() -> Outcome {
    reset();
    trap::set_handler(APF_VECTOR, on_page_ready);
    match oskit_pv_apf::x86::probe() {
        Some(f) if f.has(KvmFeatures::ASYNC_PF_INT) => real_apf(f),
        Some(f) => {
            println!("  kvm: yes, but async-PF-int not offered ({f:?}): the host model stands in");
            crate::trace!("apf", "KVM without async-PF-int; host model");
            sim_apf()
        }
        None => {
            println!("  not KVM: the host model stands in");
            crate::trace!("apf", "not KVM; host model");
            sim_apf()
        }
    }
}

/// Under KVM with async-PF-int: enable on every CPU for real, wait, report, disable.
fn real_apf(features: KvmFeatures) -> Outcome {
    MODE.store(REAL, Ordering::Release);
    fault::set_hook(Some(apf_hook));
    smp::on_each_cpu(enable_real);
    let enabled = ENABLED.load(Ordering::Relaxed);
    sched::sleep_ticks(2 * apic::HZ);
    smp::on_each_cpu(disable_real);
    fault::set_hook(None);
    MODE.store(OFF, Ordering::Release);
    let online = percpu::online_count();
    ensure!(
        enabled == online && ENABLE_FAILED.load(Ordering::Relaxed) == 0,
        "enabled on {enabled} of {online} CPUs ({} failures)",
        ENABLE_FAILED.load(Ordering::Relaxed)
    );
    let events = SLEPT.load(Ordering::Relaxed)
        + CAME_FIRST.load(Ordering::Relaxed)
        + READY_IRQS.load(Ordering::Relaxed);
    println!(
        "  kvm {features:?}: async PF (interrupt protocol) enabled on {enabled} CPUs; the host \
         delivered {events} events in 2 s"
    );
    checks::figures(format_args!(
        "KVM: enabled on {enabled} CPUs, {events} host events, {} waits",
        SLEPT.load(Ordering::Relaxed)
    ));
    Ok(())
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

/// Waits until `done()` (at most [`PHASE_TICKS`]).
fn wait_until(done: impl Fn() -> bool) -> bool {
    let deadline = sched::ticks() + PHASE_TICKS;
    while !done() {
        if sched::ticks() > deadline {
            return false;
        }
        sched::sleep_ticks(1);
    }
    true
}

fn all_returned(range: core::ops::Range<usize>) -> bool {
    range
        .clone()
        .all(|i| RETURNS[i].load(Ordering::Acquire) >= 1)
}

/// The three phases against the host model; on a failure, wakes everyone before returning.
fn sim_phases(online: usize) -> Result<(usize, usize, usize, usize), checks::Failure> {
    let for_all_count = online + 1;
    // 1. Sleeps and wakes.
    let now = sched::ticks();
    let normal = {
        let mut plan = PLAN.lock();
        let first = plan.len;
        for _ in 0..NORMAL {
            plan.add(Kind::Normal, usize::MAX, now);
        }
        first..plan.len
    };
    if !wait_until(|| all_returned(normal.clone())) {
        fail!(
            "sleep/wake phase: {} of {NORMAL} faults returned",
            normal
                .clone()
                .filter(|&i| RETURNS[i].load(Ordering::Relaxed) > 0)
                .count()
        );
    }
    // 2. Wakes before their waits, spread over the CPUs.
    let now = sched::ticks();
    let early = {
        let mut plan = PLAN.lock();
        let first = plan.len;
        for k in 0..EARLY {
            plan.add(Kind::Early, k % online, now);
        }
        first..plan.len
    };
    if !wait_until(|| all_returned(early.clone())) {
        fail!("early-wake phase: not every fault returned");
    }
    // 3. Sleepers ended by a wake-all of their CPU (plus a stray wake there).
    let now = sched::ticks();
    let for_all = {
        let mut plan = PLAN.lock();
        let first = plan.len;
        for _ in 0..for_all_count {
            plan.add(Kind::ForAll, usize::MAX, now);
        }
        first..plan.len
    };
    let asleep = || {
        let injected = PLAN.lock().toks[for_all.clone()]
            .iter()
            .all(|t| t.st == St::Injected);
        injected && APF_SIM.table().census(None).0 == for_all_count
    };
    if !wait_until(asleep) {
        fail!("wake-all phase: the sleepers did not all go to sleep");
    }
    let mut strays = 0;
    for cpu in 0..online {
        if APF_SIM.table().census(Some(cpu as u32)).0 > 0 {
            let mut plan = PLAN.lock();
            let now = sched::ticks();
            if plan.add(Kind::Stray, cpu, now).is_some() {
                strays += 1;
            }
            plan.wake_all[cpu] = true;
        }
    }
    if !wait_until(|| all_returned(for_all.clone())) {
        fail!("wake-all phase: not every sleeper returned");
    }
    let dummies_gone = wait_until(|| DUMMIES_FREED.load(Ordering::Acquire) >= strays);
    ensure!(
        dummies_gone,
        "the wake-alls freed {} dummies of {strays} strays",
        DUMMIES_FREED.load(Ordering::Relaxed)
    );
    Ok((normal.len(), early.len(), for_all.len(), strays))
}

/// Without KVM: the host model, from the timer interrupt.
fn sim_apf() -> Outcome {
    let online = percpu::online_count();
    // Before the enables: their wake-alls come at once.
    MODE.store(SIM, Ordering::Release);
    smp::on_each_cpu(enable_sim);
    let enabled = ENABLED.load(Ordering::Relaxed);
    if enabled != online {
        smp::on_each_cpu(disable_sim);
        MODE.store(OFF, Ordering::Release);
        fail!("enabled on {enabled} of {online} CPUs");
    }
    fault::set_hook(Some(apf_hook));
    let workers = (online + 2).min(MAX_WORKERS);
    let mut tasks = [None; MAX_WORKERS];
    for (slot, task) in tasks.iter_mut().enumerate().take(workers) {
        *task = sched::spawn("apf-worker", worker, 0);
        if let Some(t) = *task {
            WORKERS[slot].store(t.pid(), Ordering::Release);
        }
    }
    let hooked = apic::add_tick_hook(host_tick);
    let phases = if hooked && tasks[..workers].iter().all(Option::is_some) {
        sim_phases(online)
    } else {
        Err(checks::Failure::new(format_args!(
            "no tick-hook slot or no task slot"
        )))
    };
    if phases.is_err() {
        // Inject nothing more, and wake whoever still sleeps, so the workers can end.
        PLAN.lock()
            .toks
            .iter_mut()
            .filter(|t| t.st == St::ToInject)
            .for_each(|t| t.st = St::Done);
        for _ in 0..50 {
            if APF_SIM.table().census(None).0 == 0 {
                break;
            }
            PLAN.lock().wake_all[..online].fill(true);
            sched::sleep_ticks(2);
        }
    }
    apic::remove_tick_hook(host_tick);
    STOP.store(true, Ordering::Release);
    for task in tasks.iter().flatten() {
        let _ = sched::join(*task);
    }
    WORKERS.iter().for_each(|w| w.store(0, Ordering::Relaxed));
    fault::set_hook(None);
    smp::on_each_cpu(disable_sim);
    MODE.store(OFF, Ordering::Release);
    let (normal, early, for_all, strays) = phases?;

    let injected = INJECTED.load(Ordering::Relaxed);
    let slept = SLEPT.load(Ordering::Relaxed);
    let came_first = CAME_FIRST.load(Ordering::Relaxed);
    let woken = WOKEN.load(Ordering::Relaxed);
    let by_all = WOKEN_BY_ALL.load(Ordering::Relaxed);
    let dummies = DUMMIES_ADDED.load(Ordering::Relaxed);
    let wake_alls = WAKE_ALLS.load(Ordering::Relaxed);
    let unblocks = UNBLOCKS.load(Ordering::Relaxed);
    let len = PLAN.lock().len;
    each_task_woken_once_per_sleep()?;
    ensure!(
        ERRORS.load(Ordering::Relaxed) == 0 && UNCLAIMED.load(Ordering::Relaxed) == 0,
        "{} host/handler errors, {} not-presents the hook did not claim",
        ERRORS.load(Ordering::Relaxed),
        UNCLAIMED.load(Ordering::Relaxed)
    );
    ensure!(
        injected == normal + early + for_all,
        "{injected} not presents injected, planned {}",
        normal + early + for_all
    );
    for i in 0..len {
        let kind = PLAN.lock().toks[i].kind;
        let (returns, how) = (
            RETURNS[i].load(Ordering::Relaxed),
            HOW[i].load(Ordering::Relaxed),
        );
        let expected = match kind {
            Kind::Normal | Kind::ForAll => (1, 1),
            Kind::Early => (1, 2),
            Kind::Stray => (0, 0),
        };
        ensure!(
            (returns, how) == expected,
            "token {:#x} ({kind:?}): fault returned {returns} times, how {how}",
            token(i)
        );
    }
    ensure!(
        slept == normal + for_all && came_first == early,
        "{slept} slept, {came_first} found their wake first"
    );
    ensure!(
        woken == normal && by_all == for_all && unblocks == slept,
        "{woken} woken by page ready, {by_all} by wake-all, {unblocks} unblocks for {slept} \
         sleepers"
    );
    ensure!(
        dummies == early + strays && DUMMIES_FREED.load(Ordering::Relaxed) == strays,
        "{dummies} dummies added, {} freed by wake-all ({early} early, {strays} strays)",
        DUMMIES_FREED.load(Ordering::Relaxed)
    );
    ensure!(
        wake_alls >= 1
            && DUPLICATES.load(Ordering::Relaxed) == 0
            && DROPPED.load(Ordering::Relaxed) == 0,
        "{wake_alls} wake-alls, {} duplicate and {} dropped wakes",
        DUPLICATES.load(Ordering::Relaxed),
        DROPPED.load(Ordering::Relaxed)
    );
    let table = APF_SIM.table();
    ensure!(
        table.dummies_in_use() == 0 && table.census(None) == (0, 0),
        "left in the table: {} dummies, census {:?}",
        table.dummies_in_use(),
        table.census(None)
    );
    let acks: u64 = (0..online).map(|c| HOST.acks(c).unwrap_or(0)).sum::<u64>();
    println!(
        "  {injected} not presents: {slept} slept in the #PF and were woken ({woken} by page \
         ready, {by_all} by {wake_alls} wake-alls), {came_first} found their wake first; \
         {dummies} dummies ({strays} stray), none left; {acks} ACKs"
    );
    checks::figures(format_args!(
        "model: {slept} waits, {} wakes, {dummies} dummies, {wake_alls} wake-alls",
        woken + by_all
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// scenario=apf-real: real async page faults from this machine's KVM.

/// Where each ring-3 sweeper's region starts (past the data region and the shared page).
const SWEEP_START: u64 = usermode::DATA_START + (64 << 20);
/// Bytes each sweeper touches (4 KiB pages).
const SWEEP_BYTES: u64 = 24 << 20;
/// The page shared with every sweeper: word 0 = stop, word 1 + n = sweeper n's passes.
const SWEEP_SHARED: u64 = usermode::DATA_START + (60 << 20);
/// Sweepers at most.
const MAX_SWEEPERS: usize = 4;
/// A sweeper region's blocks: 2 MiB each (order 9).
const BLOCK: u64 = 2 << 20;
const SWEEP_BLOCKS: usize = (SWEEP_BYTES / BLOCK) as usize;
/// How long the sweep lasts, in ticks, at most, and the not-present events it aims for.
const SWEEP_TICKS: u64 = 90 * apic::HZ;
const SWEEP_TARGET: usize = 300;

/// Ring 3: writes every page of its region, then sweeps it (read, check, rewrite) until the
/// kernel says stop; counts its passes in the shared page. Returns 0, or -1 if a page lost its
/// contents (the host's eviction must be invisible).
fn u_sweep(n: u64) -> i64 {
    let pages = SWEEP_BYTES / 4096;
    let stop = SWEEP_SHARED as *const u64;
    let passes = (SWEEP_SHARED + 8 * (n + 1)) as *mut u64;
    let page = |i: u64| (SWEEP_START + i * 4096) as *mut u64;
    // SAFETY: the region and the shared page are mapped writable in this task's space.
    unsafe {
        for i in 0..pages {
            page(i).write_volatile(n << 32 | i);
        }
        let mut pass = 0u64;
        while stop.read_volatile() == 0 {
            for i in 0..pages {
                let p = page(i);
                if p.read_volatile() != (n << 32 | i) + pass {
                    return -1;
                }
                p.write_volatile((n << 32 | i) + pass + 1);
            }
            pass += 1;
            passes.write_volatile(pass);
        }
    }
    0
}

/// `scenario=apf-real`: under KVM with async-PF-int, async PF enabled for real on every CPU
/// while ring-3 tasks sweep far more memory than the host lets stay resident (`cargo xtask
/// test` backs the guest's RAM with a file and evicts it while this runs). Every "not present"
/// the host sends puts a sweeper to sleep in the #PF; every page ready wakes it. Passes when
/// at least one not-present came, every wait ended with exactly one wake, and nobody is left
/// asleep; prints the guest's counts for the host to compare with its tracepoints.
pub fn apf_real() -> Outcome {
    reset();
    trap::set_handler(APF_VECTOR, on_page_ready);
    let Some(features) = oskit_pv_apf::x86::probe().filter(|f| f.has(KvmFeatures::ASYNC_PF_INT))
    else {
        fail!("not running on a KVM that offers async-PF-int")
    };
    MODE.store(REAL, Ordering::Release);
    fault::set_hook(Some(apf_hook));
    smp::on_each_cpu(enable_real);
    let online = percpu::online_count();
    let enabled = ENABLED.load(Ordering::Relaxed);
    let Some(shared) = frames::alloc(0) else {
        smp::on_each_cpu(disable_real);
        fail!("no frame")
    };
    // SAFETY: a frame we own, identity-mapped.
    unsafe { core::ptr::write_bytes(shared as *mut u8, 0, 4096) };
    let sweepers = (online * 2).min(MAX_SWEEPERS);
    // Each sweeper's region is made of 2 MiB blocks the check owns (mapped fixed), so that the
    // host can be told exactly which guest-physical memory to evict (the kernel's own memory
    // stays resident: emulated ring-0 code refetched from disk would only crawl).
    let mut blocks = [[0u64; SWEEP_BLOCKS]; MAX_SWEEPERS];
    let mut got = 0;
    for block in blocks.iter_mut().take(sweepers).flatten() {
        match frames::alloc(frames::MAX_ORDER) {
            Some(paddr) => {
                *block = paddr;
                got += 1;
            }
            None => break,
        }
    }
    let free_blocks = |blocks: &[[u64; SWEEP_BLOCKS]; MAX_SWEEPERS]| {
        for &b in blocks.iter().flatten().filter(|&&b| b != 0) {
            frames::free(b, frames::MAX_ORDER);
        }
    };
    if got < sweepers * SWEEP_BLOCKS {
        free_blocks(&blocks);
        frames::free(shared, 0);
        smp::on_each_cpu(disable_real);
        fault::set_hook(None);
        MODE.store(OFF, Ordering::Release);
        fail!("not enough 2 MiB blocks for {sweepers} sweepers");
    }
    let mut tasks = [None; MAX_SWEEPERS];
    for (n, slot) in tasks.iter_mut().enumerate().take(sweepers) {
        let mine = blocks[n];
        *slot = usermode::spawn_with("apf-sweeper", u_sweep, n as u64, |space| {
            vm::map_fixed(space, SWEEP_SHARED, shared, 4096, true)?;
            for (k, &paddr) in mine.iter().enumerate() {
                vm::map_fixed(space, SWEEP_START + k as u64 * BLOCK, paddr, BLOCK, true)?;
            }
            Ok(())
        })
        .ok();
    }
    // Once every sweeper has written its region, tell the host what to evict.
    let written = || {
        (0..sweepers).all(|n| {
            // SAFETY: the shared frame is ours; the sweepers write their pass counters.
            let passes = unsafe { ((shared + 8 * (n as u64 + 1)) as *const u64).read_volatile() };
            passes >= 1
        })
    };
    let deadline = sched::ticks() + SWEEP_TICKS;
    while !written() && sched::ticks() < deadline {
        sched::sleep_ticks(apic::HZ / 10);
    }
    for &b in blocks.iter().take(sweepers).flatten() {
        println!("apf-real: evict {b:#x} {BLOCK:#x}");
    }
    println!("apf-real: sweeping");
    let not_presents = || SLEPT.load(Ordering::Relaxed) + CAME_FIRST.load(Ordering::Relaxed);
    let start = sched::ticks();
    while sched::ticks() - start < SWEEP_TICKS && not_presents() < SWEEP_TARGET {
        sched::sleep_ticks(apic::HZ / 10);
    }
    // SAFETY: the frame stays ours while the sweepers run; they only read the stop word.
    unsafe { (shared as *mut u64).write_volatile(1) };
    let mut codes = [None; MAX_SWEEPERS];
    for (code, task) in codes.iter_mut().zip(tasks.iter()) {
        *code = task.map(sched::join);
    }
    println!("apf-real: done");
    free_blocks(&blocks);
    // Every not present has had its page ready by now (each sweeper returned); a short grace
    // for page readys still on their way to tasks that came first.
    sched::sleep_ticks(apic::HZ / 10);
    let left = APF_REAL.table().census(None);
    smp::on_each_cpu(disable_real);
    fault::set_hook(None);
    MODE.store(OFF, Ordering::Release);
    // SAFETY: as above; the sweepers are gone.
    let passes: u64 = (0..sweepers)
        .map(|n| unsafe { ((shared + 8 * (n as u64 + 1)) as *const u64).read_volatile() })
        .sum();
    frames::free(shared, 0);

    let slept = SLEPT.load(Ordering::Relaxed);
    let came_first = CAME_FIRST.load(Ordering::Relaxed);
    let early = RETURNED_EARLY.load(Ordering::Relaxed);
    let woken = WOKEN.load(Ordering::Relaxed);
    let wake_alls = WAKE_ALLS.load(Ordering::Relaxed);
    let dummies = DUMMIES_ADDED.load(Ordering::Relaxed);
    let irqs = READY_IRQS.load(Ordering::Relaxed);
    // The line xtask compares with the host's tracepoints.
    println!(
        "apf-real: guest not-present={} page-ready={irqs} wake-all={wake_alls} slept={slept} \
         wake-came-first={came_first} returned-early={early} woken={woken} dummies={dummies} \
         left={}",
        slept + came_first + early,
        left.0
    );
    println!(
        "  kvm {features:?}: enabled on {enabled}/{online} CPUs; {sweepers} ring-3 sweepers of \
         {} MiB, {passes} passes",
        SWEEP_BYTES >> 20
    );
    checks::figures(format_args!(
        "KVM: {} not presents, {irqs} page readys ({wake_alls} wake-alls), {slept} sleeps",
        slept + came_first + early
    ));
    ensure!(
        enabled == online && ENABLE_FAILED.load(Ordering::Relaxed) == 0,
        "enabled on {enabled} of {online} CPUs"
    );
    ensure!(
        codes[..sweepers].iter().all(|c| *c == Some(Some(0))),
        "sweepers ended with {:?} (-1: a page lost its contents)",
        &codes[..sweepers]
    );
    each_task_woken_once_per_sleep()?;
    ensure!(left == (0, 0), "left in the table: {left:?}");
    ensure!(
        ERRORS.load(Ordering::Relaxed) == 0 && DROPPED.load(Ordering::Relaxed) == 0,
        "{} handler errors, {} dropped wakes",
        ERRORS.load(Ordering::Relaxed),
        DROPPED.load(Ordering::Relaxed)
    );
    ensure!(
        slept + came_first + early > 0,
        "the host sent no not-present in {} s",
        (sched::ticks() - start) / apic::HZ
    );
    Ok(())
}
