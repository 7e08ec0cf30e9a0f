//! Checks of the timer, the scheduler and SMP bring-up.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::{
    arch::apic,
    arch::gdt::MAX_CPUS,
    arch::percpu,
    arch::smp,
    checks::Outcome,
    ensure, fail,
    kmain::CPUS_FOUND,
    println,
    task::sched::{self, TaskId},
    task::workqueue,
};

/// Deadline of a check's waiting loop, in microseconds of TSC time (generous for TCG).
const WAIT_US: u64 = 5_000_000;

/// Sleeps a tick at a time until `done()` or the deadline; returns whether `done()` became
/// true.
pub fn wait_for(mut done: impl FnMut() -> bool) -> bool {
    let deadline = apic::now_us() + WAIT_US;
    while !done() {
        if apic::now_us() > deadline {
            return false;
        }
        sched::sleep_ticks(1);
    }
    true
}

fn ticks() -> [u64; MAX_CPUS] {
    core::array::from_fn(|cpu| percpu::cpu(cpu).ticks.load(Ordering::Relaxed))
}

/// Timer interrupts arrive on every online CPU.
pub fn timer() -> Outcome {
    let online = percpu::online_count();
    let before = ticks();
    let arrived = wait_for(|| {
        let now = ticks();
        (0..online).all(|cpu| now[cpu] >= before[cpu] + 5)
    });
    let now = ticks();
    for (cpu, ticks) in now.iter().enumerate().take(online) {
        println!("  cpu {cpu}: {ticks} ticks");
    }
    ensure!(
        arrived,
        "not every CPU took 5 timer ticks: before {:?}, after {:?}",
        &before[..online],
        &now[..online]
    );
    // A sleep of 10 ticks lasts at least 10 ticks, and the task really sleeps (this CPU's
    // switches show the loop ran something else or halted meanwhile).
    let start = sched::ticks();
    sched::sleep_ticks(10);
    let slept = sched::ticks() - start;
    ensure!(slept >= 10, "sleep_ticks(10) returned after {slept} ticks");
    Ok(())
}

static STOP: AtomicBool = AtomicBool::new(false);
static PROGRESS: [AtomicU64; MAX_CPUS + 1] = [const { AtomicU64::new(0) }; MAX_CPUS + 1];

fn spinner(i: u64) -> i64 {
    while !STOP.load(Ordering::Relaxed) {
        PROGRESS[i as usize].fetch_add(1, Ordering::Relaxed);
    }
    100 + i as i64
}

/// More CPU-bound tasks than CPUs, none of which ever yields, all make progress and are each
/// preempted by the timer; each one's exit code comes back through join.
pub fn preemption() -> Outcome {
    let n = percpu::online_count() + 1;
    STOP.store(false, Ordering::Relaxed);
    PROGRESS.iter().for_each(|p| p.store(0, Ordering::Relaxed));
    let mut tasks = [None::<TaskId>; MAX_CPUS + 1];
    for (i, slot) in tasks.iter_mut().enumerate().take(n) {
        *slot = sched::spawn("spinner", spinner, i as u64);
        ensure!(slot.is_some(), "cannot spawn spinner {i}");
    }
    let preempted = |t: &Option<TaskId>| t.and_then(sched::preemptions).unwrap_or(0);
    let ok = wait_for(|| {
        tasks[..n].iter().all(|t| preempted(t) >= 2)
            && PROGRESS[..n].iter().all(|p| p.load(Ordering::Relaxed) > 0)
    });
    let counts: [u64; MAX_CPUS + 1] = core::array::from_fn(|i| preempted(&tasks[i]));
    STOP.store(true, Ordering::Relaxed);
    for (i, task) in tasks[..n].iter().enumerate() {
        let code = task.and_then(sched::join);
        ensure!(
            code == Some(100 + i as i64),
            "spinner {i} joined with {code:?}, not {}",
            100 + i
        );
    }
    println!(
        "  {n} spinners on {} CPU(s): preempted {:?} times ({} preemptions since boot)",
        n - 1,
        &counts[..n],
        sched::total_preemptions()
    );
    ensure!(
        ok,
        "spinners were not all preempted and running: preemptions {:?}",
        &counts[..n]
    );
    Ok(())
}

/// Pid of the task the tick hook should wake (0: none).
static WAKE_TARGET: AtomicU64 = AtomicU64::new(0);
/// Wakes by the tick hook that found the task blocked.
static WOKE_BLOCKED: AtomicU64 = AtomicU64::new(0);
static PHASE: AtomicU64 = AtomicU64::new(0);
const ROUNDS: i64 = 5;

fn wake_from_tick(_cpu: usize) {
    let pid = WAKE_TARGET.load(Ordering::Acquire);
    if pid == 0 {
        return;
    }
    let task = TaskId::from_pid(pid);
    if sched::is_blocked(task) && WAKE_TARGET.swap(0, Ordering::AcqRel) == pid {
        WOKE_BLOCKED.fetch_add(1, Ordering::Relaxed);
        sched::unblock(task);
    }
}

fn blocker(_: u64) -> i64 {
    // Phase 1: the check wakes us before we block; the block must not sleep.
    PHASE.store(1, Ordering::Release);
    while PHASE.load(Ordering::Acquire) != 2 {
        core::hint::spin_loop();
    }
    sched::block_current();
    PHASE.store(3, Ordering::Release);
    // Phase 2: sleep, and be woken from the timer interrupt, ROUNDS times.
    let me = sched::current().expect("blocker runs as a task").pid();
    let mut rounds = 0;
    while rounds < ROUNDS {
        let woke = WOKE_BLOCKED.load(Ordering::Acquire);
        WAKE_TARGET.store(me, Ordering::Release);
        while WOKE_BLOCKED.load(Ordering::Acquire) == woke {
            sched::block_current();
        }
        rounds += 1;
    }
    rounds
}

/// A task blocks and is woken from interrupt context (the timer tick), and a wake-up that
/// arrives before the task blocks is not lost.
pub fn block_unblock() -> Outcome {
    PHASE.store(0, Ordering::Relaxed);
    WOKE_BLOCKED.store(0, Ordering::Relaxed);
    WAKE_TARGET.store(0, Ordering::Relaxed);
    ensure!(
        apic::add_tick_hook(wake_from_tick),
        "no free tick-hook slot"
    );
    let Some(task) = sched::spawn("blocker", blocker, 0) else {
        fail!("cannot spawn the blocker")
    };
    ensure!(
        wait_for(|| PHASE.load(Ordering::Acquire) == 1),
        "the blocker never started"
    );
    ensure!(
        sched::unblock(task),
        "unblock says the live blocker is gone"
    );
    PHASE.store(2, Ordering::Release);
    let early = wait_for(|| PHASE.load(Ordering::Acquire) == 3);
    if !early {
        sched::unblock(task); // let it go on, so it can be joined
    }
    let rounds = sched::join(task);
    apic::remove_tick_hook(wake_from_tick);
    ensure!(
        early,
        "a wake-up sent before block_current was lost (the task slept)"
    );
    ensure!(
        rounds == Some(ROUNDS),
        "the blocker came back with {rounds:?}"
    );
    let woke = WOKE_BLOCKED.load(Ordering::Relaxed);
    println!("  {woke} wakes of a blocked task from the timer interrupt");
    ensure!(
        woke >= ROUNDS as u64,
        "only {woke} wakes found the task blocked"
    );
    Ok(())
}

static CALLS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// CPUs whose GS-based per-CPU data disagreed with their local APIC.
static MISMATCHES: AtomicU64 = AtomicU64::new(0);

fn count_call(cpu: usize) {
    CALLS[cpu].fetch_add(1, Ordering::Relaxed);
    let me = percpu::this_cpu();
    if me.apic_id.load(Ordering::Relaxed) != apic::id() || me.id.load(Ordering::Relaxed) != cpu {
        MISMATCHES.fetch_add(1, Ordering::Relaxed);
    }
}

/// Ticks of the other CPUs while the machine was stopped.
static STOPPED_TICKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn while_stopped() {
    let before = ticks();
    apic::delay_us(50_000); // five ticks' worth
    let after = ticks();
    for cpu in 0..MAX_CPUS {
        STOPPED_TICKS[cpu].store(after[cpu] - before[cpu], Ordering::Relaxed);
    }
}

/// Every CPU the firmware described is online and has run tasks; on each of them the per-CPU
/// data at `gs:0` is that CPU's; `on_each_cpu` runs a function exactly once on each, and
/// `stop_machine` holds every CPU with interrupts off (no CPU takes a tick meanwhile).
pub fn smp() -> Outcome {
    CALLS.iter().for_each(|c| c.store(0, Ordering::Relaxed));
    MISMATCHES.store(0, Ordering::Relaxed);
    smp::on_each_cpu(count_call);
    let calls: [u64; MAX_CPUS] = core::array::from_fn(|c| CALLS[c].load(Ordering::Relaxed));
    smp::stop_machine(while_stopped);
    let stopped: [u64; MAX_CPUS] =
        core::array::from_fn(|c| STOPPED_TICKS[c].load(Ordering::Relaxed));
    let found = CPUS_FOUND.load(Ordering::Relaxed);
    let online = percpu::online_count();
    ensure!(
        online == found,
        "{online} CPU(s) online of {found} in the MADT"
    );
    for cpu in 0..online {
        let c = percpu::cpu(cpu);
        let switches = c.switches.load(Ordering::Relaxed);
        println!(
            "  cpu {cpu}: APIC id {}, {switches} task switches",
            c.apic_id.load(Ordering::Relaxed)
        );
        ensure!(switches > 0, "cpu {cpu} never ran a task");
    }
    ensure!(
        calls
            .iter()
            .enumerate()
            .all(|(c, &n)| n == u64::from(c < online)),
        "on_each_cpu ran on the CPUs {calls:?} times, not once on each of {online}"
    );
    ensure!(
        MISMATCHES.load(Ordering::Relaxed) == 0,
        "gs:0 per-CPU data did not match the local APIC on {} CPU(s)",
        MISMATCHES.load(Ordering::Relaxed)
    );
    ensure!(
        stopped.iter().all(|&t| t == 0),
        "CPUs took {stopped:?} ticks during stop_machine"
    );
    Ok(())
}

static WORK_RAN: AtomicU64 = AtomicU64::new(0);
static WORK_IN_WORKER: AtomicU64 = AtomicU64::new(0);
static WORK_FROM_IRQ_QUEUED: AtomicBool = AtomicBool::new(false);

fn work(bit: u64) {
    WORK_RAN.fetch_or(bit, Ordering::Relaxed);
    if sched::current_name() == "kworker" {
        WORK_IN_WORKER.fetch_or(bit, Ordering::Relaxed);
    }
}

fn queue_from_tick(_cpu: usize) {
    if !WORK_FROM_IRQ_QUEUED.swap(true, Ordering::AcqRel) {
        workqueue::queue(work, 1 << 1);
    }
}

/// Work queued from a task, from an interrupts-off path and from an interrupt handler runs
/// later in the worker task, and `flush` waits for it.
pub fn workqueue() -> Outcome {
    WORK_RAN.store(0, Ordering::Relaxed);
    WORK_IN_WORKER.store(0, Ordering::Relaxed);
    WORK_FROM_IRQ_QUEUED.store(false, Ordering::Relaxed);
    ensure!(workqueue::queue(work, 1 << 0), "the queue is full");
    let irq = crate::spin::irq_save();
    let queued = workqueue::queue(work, 1 << 2);
    crate::spin::irq_restore(irq);
    ensure!(queued, "the queue is full");
    ensure!(
        apic::add_tick_hook(queue_from_tick),
        "no free tick-hook slot"
    );
    let ticked = wait_for(|| WORK_FROM_IRQ_QUEUED.load(Ordering::Acquire));
    apic::remove_tick_hook(queue_from_tick);
    ensure!(ticked, "the tick hook never ran");
    workqueue::flush();
    let ran = WORK_RAN.load(Ordering::Relaxed);
    ensure!(ran == 0b111, "work items ran: {ran:#b}, want 0b111");
    ensure!(
        WORK_IN_WORKER.load(Ordering::Relaxed) == 0b111,
        "work ran outside the worker task"
    );
    Ok(())
}
