//! Harnesses of `oskit-pv-apf`.

use std::{
    cell::{Cell, RefCell},
    pin::Pin,
};

use oskit_pv_apf::{
    ApfCpu, AsyncPf, Config, KvmFeatures, PfEvent, Scheduler,
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

/// A hostile host's event sequence (not present, page ready, wake-all, raw writes to the
/// shared area, spurious interrupts) against two vCPUs with tasks that fault, sleep and get
/// cancelled, and CPUs going offline. Never panics; every sleeper is unblocked exactly once
/// and only when its node says woken; the table never holds more than its pool of dummies
/// nor anything but the sleepers the harness queued.
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
    let enable = |vcpu: usize| {
        let cpu = &cpus[vcpu];
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
    };
    enable(0);
    enable(1);

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
        let fault = |cr2: u64, sleeping: &mut Vec<_>| fault(&apf, cpu, vcpu, cr2, sleeping);
        match op & 0x7 {
            0 => {
                if let Ok(Inject::PageFault { cr2 }) = host.not_present(vcpu, cpu, token_of(arg)) {
                    fault(cr2, &mut sleeping);
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
                    Ok(Inject::PageFault { cr2 }) => fault(cr2, &mut sleeping),
                    Ok(Inject::Interrupt { .. }) => {
                        let _ = apf.handle_ready_interrupt(&host.vcpu(vcpu), cpu);
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
                fault(u64::from(token) << 8 | u64::from(arg), &mut sleeping);
            }
            4 => {
                host.poke(cpu, u32::from(arg & 3), token_of(arg));
                let _ = apf.handle_ready_interrupt(&host.vcpu(vcpu), cpu);
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
                enable(vcpu);
            }
            _ => {
                let _ = apf.wake(token_of(arg));
            }
        }
        check(&apf, &mut sleeping);
    }

    // The host says everything is in: nobody may still sleep.
    for vcpu in 0..CPUS {
        apf.wake_all_of(vcpu as u32);
    }
    check(&apf, &mut sleeping);
    assert!(sleeping.is_empty(), "sleepers left after wake-all");
    for (vcpu, cpu) in cpus.iter().enumerate() {
        apf.disable_cpu(&host.vcpu(vcpu), cpu).unwrap();
    }
}

/// What the guest's page-fault handler does, with a sleep turned into a queued node.
fn fault<'a>(
    apf: &'a Apf<'_>,
    cpu: &ApfCpu,
    vcpu: usize,
    cr2: u64,
    sleeping: &mut Vec<(usize, usize, Node<'a>)>,
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
                if node.as_ref().enqueue() == Enqueue::Queued {
                    sleeping.push((task, vcpu, node));
                }
            }
        }
        Some(event) => {
            let _ = apf.dispatch(event);
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
