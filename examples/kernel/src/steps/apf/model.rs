//! The `apf` check without KVM's async PF: the crate's host model (`sim::SimHost`, interrupt
//! protocol) plays KVM, driven from the timer interrupt (`apic::add_tick_hook`) on each CPU:
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

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use oskit_pv_apf::{Protocol, sim::Inject};

use super::{
    APF_CPU, APF_SIM, CAME_FIRST, DROPPED, DUMMIES_ADDED, DUMMIES_FREED, DUPLICATES, ENABLE_FAILED,
    ENABLED, ERRORS, HOST, HOW, INJECTED, MAX_TOKENS, MODE, OFF, RETURNS, SIM, SLEPT, UNBLOCKS,
    UNCLAIMED, WAKE_ALLS, WOKEN, WOKEN_BY_ALL, apf_hook, area_phys, config,
    each_task_woken_once_per_sleep, oskit_apf_touch,
};
use crate::{
    arch::apic,
    arch::gdt::MAX_CPUS,
    arch::percpu,
    arch::smp,
    checks::{self, Outcome},
    ensure, fail,
    mm::fault,
    println, spin,
    spin::SpinLock,
    task::sched::{self, TaskId},
};

/// Unmapped kernel addresses whose low 32 bits carry a token (320 GiB: nothing is mapped
/// there; the kernel stacks are at 256 GiB, user space starts at 512 GiB).
const TOKEN_WINDOW: u64 = 320 << 30;
/// Ticks the model takes to bring a page in.
const READY_DELAY: u64 = 3;
/// Worker tasks at most (one more than the CPUs plus the wake-all sleepers).
const MAX_WORKERS: usize = MAX_CPUS + 2;
/// Ticks a phase may take.
const PHASE_TICKS: u64 = 600;

/// Sleeps and wakes; wakes before waits. (The waits ended by a wake-all are one more than
/// the CPUs: every worker but one sleeps.)
const NORMAL: usize = 8;
const EARLY: usize = 4;

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

/// Forgets the previous run's plan and workers.
pub(super) fn reset() {
    let mut plan = PLAN.lock();
    plan.len = 0;
    plan.wake_all = [false; MAX_CPUS];
    drop(plan);
    STOP.store(false, Ordering::Relaxed);
    WORKERS.iter().for_each(|w| w.store(0, Ordering::Relaxed));
}

fn enable_sim(cpu: usize) {
    let irq = spin::irq_save();
    // SAFETY: APF_CPU is static; in the model the area's physical address is its address;
    // interrupts are off; this runs on `cpu`.
    let r = unsafe { APF_SIM.enable_cpu(&HOST.vcpu(cpu), &APF_CPU[cpu], area_phys(cpu), config()) };
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
pub(super) fn sim_apf() -> Outcome {
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
