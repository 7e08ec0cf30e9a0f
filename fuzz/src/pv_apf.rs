//! Harnesses of `oskit-pv-apf`.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    pin::Pin,
};

use oskit_pv_apf::{
    ApfCpu, AsyncEvent, AsyncPf, Config, KvmFeatures, PfEvent, Scheduler,
    sim::{Inject, SimHost, SimVcpu},
    table::{Enqueue, WaitNode, Waiter},
};

const CPUS: usize = 2;
const TASKS: usize = 12;
const DUMMIES: usize = 4;

/// Records unblocks instead of switching tasks: a sleeping task is a pinned [`WaitNode`].
struct Recorder {
    cpu: Cell<u32>,
    unblocks: RefCell<[u32; TASKS]>,
}

impl Scheduler for Recorder {
    type Task = usize;
    fn current_task(&self) -> usize {
        unreachable!("the harness queues its own nodes")
    }
    fn current_cpu(&self) -> u32 {
        self.cpu.get()
    }
    fn can_sleep(&self) -> bool {
        true
    }
    fn block(&self) {
        unreachable!("the harness never blocks")
    }
    fn unblock(&self, task: usize) {
        self.unblocks.borrow_mut()[task] += 1;
    }
    fn halt(&self) {
        unreachable!("the harness never halts")
    }
}

type Apf<'h> = AsyncPf<SimVcpu<'h, CPUS>, Recorder, DUMMIES>;
type Node<'a> = Pin<Box<WaitNode<'a, usize, DUMMIES>>>;

/// Page-ready wakes that came before their "not present" (token -> vCPU it came on), as the
/// guest must remember them: a later wait for the token must not sleep. A wake-all of a vCPU
/// forgets that vCPU's.
type Early = HashMap<u32, usize>;

/// A hostile host's event sequence (not present, page ready, wake-all, raw writes to the
/// shared area, spurious interrupts) against two vCPUs with tasks that fault, sleep and get
/// cancelled, and CPUs going offline. Never panics; every sleeper is unblocked exactly once
/// and only when its node says woken; the table never holds more than its pool of dummies
/// nor anything but the sleepers the harness queued. No wake is lost: a page ready for a
/// token wakes its sleepers, and one that came first (even with the dummy pool full) makes
/// the token's later wait return at once. No wake-all at the end papers over a lost wake.
pub fn host_events(data: &[u8]) {
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next();
    let legacy = next().is_some_and(|b| b & 1 == 1);
    let host: &SimHost<CPUS> = &if legacy {
        SimHost::kvm(KvmFeatures::ASYNC_PF)
    } else {
        SimHost::modern()
    };
    let cpus: Box<[ApfCpu; CPUS]> = Box::new([ApfCpu::new(), ApfCpu::new()]);
    let apf = Apf::new(Recorder {
        cpu: Cell::new(0),
        unblocks: RefCell::new([0; TASKS]),
    });
    let mut early = Early::new();
    let enable = |vcpu: usize, early: &mut Early| {
        let cpu = &cpus[vcpu];
        apf.scheduler().cpu.set(vcpu as u32);
        // SAFETY: `cpus` is boxed and outlives every use of the host below; the sim's
        // physical addresses are virtual ones.
        unsafe {
            apf.enable_cpu(
                &host.vcpu(vcpu),
                cpu,
                cpu.area_addr() as u64,
                Config::new(0xec),
            )
        }
        .expect("the sim host accepts the guest's choice");
        // The wake-all the host queues on enable (interrupt protocol), delivered at once.
        if let Ok(Some(Inject::Interrupt { .. })) = host.deliver_queued(vcpu, cpu) {
            ready_interrupt(&apf, host, vcpu, cpu, &[], early);
        }
    };
    enable(0, &mut early);
    enable(1, &mut early);

    let mut sleeping: Vec<(usize, usize, Node<'_>)> = Vec::new();
    let token_of = |b: u8| -> u32 {
        match b & 0x1f {
            0x1f => u32::MAX,
            0x1e => 0,
            t => u32::from(t) + 1,
        }
    };

    while let Some(op) = next() {
        let vcpu = usize::from(op >> 7);
        let cpu = &cpus[vcpu];
        apf.scheduler().cpu.set(vcpu as u32);
        let arg = next().unwrap_or(0);
        let fault = |cr2: u64, sleeping: &mut Vec<_>, early: &mut Early| {
            fault(&apf, cpu, vcpu, cr2, sleeping, early)
        };
        match op & 0x7 {
            0 => {
                if let Ok(Inject::PageFault { cr2 }) = host.not_present(vcpu, cpu, token_of(arg)) {
                    fault(cr2, &mut sleeping, &mut early);
                }
            }
            1 | 2 => {
                let token = if op & 0x7 == 2 {
                    u32::MAX
                } else {
                    token_of(arg)
                };
                // A wake-all of this vCPU must leave the other vCPU's sleepers asleep.
                let others = |sleeping: &Vec<(usize, usize, Node<'_>)>| -> Vec<usize> {
                    sleeping
                        .iter()
                        .filter(|(_, v, n)| *v != vcpu && !n.is_woken())
                        .map(|(t, _, _)| *t)
                        .collect()
                };
                let before = (token == u32::MAX).then(|| others(&sleeping));
                match host.page_ready(vcpu, cpu, token) {
                    Ok(Inject::PageFault { cr2 }) => fault(cr2, &mut sleeping, &mut early),
                    Ok(Inject::Interrupt { .. }) => {
                        ready_interrupt(&apf, host, vcpu, cpu, &sleeping, &mut early)
                    }
                    Err(_) => {}
                }
                if let Some(before) = before {
                    assert_eq!(
                        others(&sleeping),
                        before,
                        "wake-all of vCPU {vcpu} reached another"
                    );
                }
            }
            3 => {
                // Raw bytes in the area, then a #PF with an arbitrary CR2.
                let token = u32::from_le_bytes([arg, next().unwrap_or(0), 0, 0]);
                host.poke(cpu, u32::from(next().unwrap_or(0)), token_of(arg));
                fault(
                    u64::from(token) << 8 | u64::from(arg),
                    &mut sleeping,
                    &mut early,
                );
            }
            4 => {
                host.poke(cpu, u32::from(arg & 3), token_of(arg));
                ready_interrupt(&apf, host, vcpu, cpu, &sleeping, &mut early);
            }
            5 => {
                // A sleeping task is killed: its node leaves the table.
                if !sleeping.is_empty() {
                    let (task, _, node) = sleeping.swap_remove(usize::from(arg) % sleeping.len());
                    let woken = node.is_woken();
                    drop(node);
                    let unblocks = &mut apf.scheduler().unblocks.borrow_mut()[task];
                    assert_eq!(*unblocks, u32::from(woken), "task {task} unblocks");
                    *unblocks = 0;
                }
            }
            6 => {
                let _ = apf.cpu_offline(&host.vcpu(vcpu), cpu, vcpu as u32);
                assert!(
                    sleeping.iter().all(|(_, v, n)| n.is_woken() || *v != vcpu),
                    "offline CPU {vcpu} left a sleeper"
                );
                assert_eq!(apf.table().census(Some(vcpu as u32)), (0, 0));
                early.retain(|_, v| *v != vcpu);
                enable(vcpu, &mut early);
            }
            _ => {
                let token = token_of(arg);
                let event = AsyncEvent::Woke(apf.wake(token));
                record_ready(event, token, vcpu, &sleeping, &mut early);
            }
        }
        check(&apf, &mut sleeping);
    }

    // What still sleeps is waiting for a page ready that never came (checked at each one),
    // so the sleepers are cancelled, not woken: a wake-all here would hide a lost wake.
    sleeping.clear();
    check(&apf, &mut sleeping);
    for (vcpu, cpu) in cpus.iter().enumerate() {
        apf.disable_cpu(&host.vcpu(vcpu), cpu).unwrap();
    }
}

/// The page-ready interrupt handler on `vcpu`, with the token it takes from the area fed to
/// the model.
fn ready_interrupt(
    apf: &Apf<'_>,
    host: &SimHost<CPUS>,
    vcpu: usize,
    cpu: &ApfCpu,
    sleeping: &[(usize, usize, Node<'_>)],
    early: &mut Early,
) {
    let token = cpu.area().token.load(std::sync::atomic::Ordering::Relaxed);
    if let Ok(Some(event)) = apf.handle_ready_interrupt(&host.vcpu(vcpu), cpu) {
        record_ready(event, token, vcpu, sleeping, early);
    }
}

/// A page ready for `token` was handled on `vcpu`: its sleepers must all be woken now, and if
/// nobody slept the guest must remember it (`early`). A wake-all forgets the vCPU's.
fn record_ready(
    event: AsyncEvent,
    token: u32,
    vcpu: usize,
    sleeping: &[(usize, usize, Node<'_>)],
    early: &mut Early,
) {
    match event {
        AsyncEvent::Woke(_) => {
            let asleep = sleeping
                .iter()
                .any(|(_, _, n)| n.token() == token && !n.is_woken());
            assert!(!asleep, "page ready for {token:#x} left a sleeper asleep");
            if !sleeping.iter().any(|(_, _, n)| n.token() == token) {
                early.entry(token).or_insert(vcpu);
            }
        }
        AsyncEvent::WokeAll(_) => early.retain(|_, v| *v != vcpu),
        _ => {}
    }
}

/// What the guest's page-fault handler does, with a sleep turned into a queued node.
fn fault<'a>(
    apf: &'a Apf<'_>,
    cpu: &ApfCpu,
    vcpu: usize,
    cr2: u64,
    sleeping: &mut Vec<(usize, usize, Node<'a>)>,
    early: &mut Early,
) {
    match cpu.take_pf_event(cr2) {
        None => {}
        Some(PfEvent::NotPresent(token)) => {
            let busy = |t: usize| sleeping.iter().any(|(s, _, _)| *s == t);
            if let Some(task) = (0..TASKS).find(|&t| !busy(t)) {
                let node = Box::pin(WaitNode::new(
                    apf.table(),
                    token,
                    vcpu as u32,
                    Waiter::Task(task),
                ));
                let enqueued = node.as_ref().enqueue();
                if early.remove(&token).is_some() {
                    assert_ne!(
                        enqueued,
                        Enqueue::Queued,
                        "the wake of {token:#x} came first, yet its wait sleeps"
                    );
                }
                if enqueued == Enqueue::Queued {
                    sleeping.push((task, vcpu, node));
                }
            }
        }
        Some(event) => {
            let token = match event {
                PfEvent::Ready(token) => token,
                _ => u32::MAX,
            };
            let done = apf.dispatch(event);
            record_ready(done, token, vcpu, sleeping, early);
        }
    }
}

/// Woken sleepers were unblocked exactly once and finish; the others were not unblocked, and
/// the table holds exactly them plus at most `DUMMIES` dummies.
fn check(apf: &Apf<'_>, sleeping: &mut Vec<(usize, usize, Node<'_>)>) {
    let mut unblocks = apf.scheduler().unblocks.borrow_mut();
    sleeping.retain(|(task, _, node)| {
        let n = unblocks[*task];
        if node.is_woken() {
            assert_eq!(n, 1, "woken task {task} unblocked {n} times");
            unblocks[*task] = 0;
            false
        } else {
            assert_eq!(n, 0, "sleeping task {task} unblocked");
            true
        }
    });
    assert!(
        unblocks.iter().all(|&n| n == 0),
        "a task that was not asleep got unblocked"
    );
    let (waiters, dummies) = apf.table().census(None);
    assert_eq!(waiters, sleeping.len(), "table and sleepers disagree");
    assert!(dummies <= DUMMIES && apf.table().dummies_in_use() == dummies);
}
