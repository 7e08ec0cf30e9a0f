//! The guest side driven by the software KVM host, with std threads as tasks.

mod common;

use std::{
    sync::{Arc, Mutex, mpsc},
    thread,
    time::Duration,
};

use common::{ThreadSched, XorShift};
use oskit_pv_apf::{
    ApfCpu, AsyncEvent, AsyncPf, Config, PfOutcome, Protocol, Wake,
    abi::{EN_DELIVERY_AS_INT, EN_ENABLED, TOKEN_WAKE_ALL},
    sim::{Inject, SimHost, SimVcpu},
};

const CPUS: usize = 2;
const VECTOR: u8 = 0xec;

type Apf = AsyncPf<SimVcpu<'static, CPUS>, &'static ThreadSched, 8>;

/// One guest: the host, per-CPU state, and a lock per vCPU that serialises what one vCPU
/// does at a time (an injection and the handler entry it leads to).
struct Guest {
    host: &'static SimHost<CPUS>,
    cpus: &'static [ApfCpu; CPUS],
    vcpu_lock: [Mutex<()>; CPUS],
    apf: Apf,
    sched: &'static ThreadSched,
    leaked: Leaked,
}

/// What `guest()` leaked, as the raw pointers `Box::into_raw` gave, to be freed on drop.
struct Leaked(*mut SimHost<CPUS>, *mut [ApfCpu; CPUS], *mut ThreadSched);

// SAFETY: only the pointers move between threads; they are dereferenced once, in `Drop`.
unsafe impl Send for Leaked {}
// SAFETY: `&Leaked` gives no access to the pointees.
unsafe impl Sync for Leaked {}

fn guest(host: SimHost<CPUS>, tasks: usize, legacy_only: bool) -> Arc<Guest> {
    let leaked = Leaked(
        Box::into_raw(Box::new(host)),
        Box::into_raw(Box::new([ApfCpu::new(), ApfCpu::new()])),
        Box::into_raw(Box::new(ThreadSched::new(tasks))),
    );
    // SAFETY: fresh boxes, freed only when the `Guest` holding these references is dropped.
    let (host, cpus, sched): (
        &'static SimHost<CPUS>,
        &'static [ApfCpu; CPUS],
        &'static ThreadSched,
    ) = unsafe { (&*leaked.0, &*leaked.1, &*leaked.2) };
    let apf = Apf::new(sched);
    let config = if legacy_only {
        Config {
            vector: None,
            ..Config::new(0)
        }
    } else {
        Config::new(VECTOR)
    };
    for (i, cpu) in cpus.iter().enumerate() {
        // SAFETY: the area is leaked (static) and the sim's physical addresses are virtual.
        unsafe { apf.enable_cpu(&host.vcpu(i), cpu, cpu.area_addr() as u64, config) }
            .expect("enable");
        // Like KVM, the host sends a wake-all right after an enable (interrupt protocol).
        if let Some(Inject::Interrupt { .. }) = host.deliver_queued(i, cpu).expect("queue") {
            ThreadSched::on_cpu(i as u32);
            let event = apf.handle_ready_interrupt(&host.vcpu(i), cpu).expect("ack");
            assert_eq!(
                event,
                Some(AsyncEvent::WokeAll(oskit_pv_apf::WakeAll::default()))
            );
        }
    }
    Arc::new(Guest {
        host,
        cpus,
        vcpu_lock: [Mutex::new(()), Mutex::new(())],
        apf,
        sched,
        leaked,
    })
}

impl Drop for Guest {
    fn drop(&mut self) {
        for (i, cpu) in self.cpus.iter().enumerate() {
            let _ = self.apf.disable_cpu(&self.host.vcpu(i), cpu);
        }
        // SAFETY: `guest()` made these three boxes for this `Guest` alone, and the last
        // reference to the `Guest` is going: nothing uses them after this (the `apf` field,
        // dropped next, holds a plain reference to the scheduler and does not touch it).
        unsafe {
            drop(Box::from_raw(self.leaked.0));
            drop(Box::from_raw(self.leaked.1));
            drop(Box::from_raw(self.leaked.2));
        }
    }
}

impl Guest {
    /// Task `cpu` touches a page the host swapped out: the #PF arrives and the task waits.
    fn fault(&self, vcpu: usize, token: u32) -> AsyncEvent {
        let event = {
            let _vcpu = self.vcpu_lock[vcpu].lock().unwrap();
            let Inject::PageFault { cr2 } = self
                .host
                .not_present(vcpu, &self.cpus[vcpu], token)
                .unwrap()
            else {
                panic!("not present must be a #PF")
            };
            self.cpus[vcpu]
                .take_pf_event(cr2)
                .expect("an async PF event")
        };
        self.apf.dispatch(event)
    }

    /// The host says `token` is ready on `vcpu`; the handler runs there.
    fn ready(&self, vcpu: usize, token: u32) -> AsyncEvent {
        let _vcpu = self.vcpu_lock[vcpu].lock().unwrap();
        ThreadSched::on_cpu(vcpu as u32);
        let cpu = &self.cpus[vcpu];
        match self.host.page_ready(vcpu, cpu, token).unwrap() {
            Inject::Interrupt { vector } => {
                assert_eq!(vector, VECTOR);
                self.apf
                    .handle_ready_interrupt(&self.host.vcpu(vcpu), cpu)
                    .unwrap()
                    .expect("a token")
            }
            Inject::PageFault { cr2 } => self
                .apf
                .handle_page_fault_event(cpu, cr2)
                .expect("page ready #PF not recognised"),
        }
    }
}

/// Spawns task `n` on `vcpu` faulting on `token`; reports its outcome on `done`.
fn spawn_task(
    g: &Arc<Guest>,
    vcpu: usize,
    token: u32,
    done: &mpsc::Sender<(usize, AsyncEvent)>,
) -> thread::JoinHandle<()> {
    let (g, done) = (g.clone(), done.clone());
    let (registered_tx, registered_rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let task = g.sched.enter(vcpu as u32, true);
        registered_tx.send(()).unwrap();
        let event = g.fault(vcpu, token);
        done.send((task, event)).unwrap();
    });
    registered_rx.recv().unwrap();
    handle
}

fn await_all(done: &mpsc::Receiver<(usize, AsyncEvent)>, n: usize) -> Vec<(usize, AsyncEvent)> {
    (0..n)
        .map(|_| {
            done.recv_timeout(Duration::from_secs(20))
                .expect("a task never woke: lost wake")
        })
        .collect()
}

fn wait_until_waiting(g: &Guest, cpu: Option<u32>, waiters: usize) {
    for _ in 0..20_000 {
        if g.apf.table().census(cpu).0 == waiters {
            return;
        }
        thread::sleep(Duration::from_micros(100));
    }
    panic!("tasks never queued");
}

/// Random interleavings of faults and wakes (ready before or after not-present) on two vCPUs:
/// every task finishes, each sleeper was unblocked exactly once, no dummy is left.
fn random_orders(legacy: bool) {
    let seeds = if cfg!(miri) { 2 } else { 6 };
    for seed in 1..=seeds {
        const TASKS: usize = 8;
        let mut rng = XorShift::new(seed * 0x9e37_79b9);
        let g = guest(
            if legacy {
                SimHost::kvm(oskit_pv_apf::KvmFeatures::ASYNC_PF)
            } else {
                SimHost::modern()
            },
            TASKS,
            legacy,
        );
        let (done_tx, done_rx) = mpsc::channel();
        let mut handles = Vec::new();
        let mut early = Vec::new();
        for n in 0..TASKS {
            let vcpu = n % CPUS;
            let token = 0x100 + n as u32;
            if rng.below(2) == 0 {
                // Ready before not present: leaves a dummy the fault consumes.
                assert_eq!(g.ready(vcpu, token), AsyncEvent::Woke(Wake::DummyAdded));
                early.push(n);
            }
            handles.push(spawn_task(&g, vcpu, token, &done_tx));
        }
        let mut late: Vec<usize> = (0..TASKS).filter(|n| !early.contains(n)).collect();
        // Shuffle the order of the remaining wakes.
        for i in (1..late.len()).rev() {
            late.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for &n in &late {
            let event = g.ready(n % CPUS, 0x100 + n as u32);
            // Whether the task queued yet is a race: either it is woken, or the wake waits.
            assert!(
                matches!(event, AsyncEvent::Woke(Wake::Woke(1) | Wake::DummyAdded)),
                "{event:?}"
            );
        }
        let results = await_all(&done_rx, TASKS);
        for h in handles {
            h.join().unwrap();
        }
        for (task, event) in results {
            let unblocks = g.sched.unblocked(task);
            match event {
                AsyncEvent::Slept => assert_eq!(unblocks, 1, "task {task} woken {unblocks}x"),
                AsyncEvent::WakeCameFirst => assert_eq!(unblocks, 0, "task {task}"),
                other => panic!("task {task}: {other:?}"),
            }
        }
        assert_eq!(g.apf.table().census(None), (0, 0), "entries left behind");
        assert_eq!(g.apf.table().dummies_in_use(), 0);
        if !legacy {
            // One ACK per page-ready interrupt (and one per CPU for the enable's wake-all).
            let acks: u64 = (0..CPUS).map(|i| g.host.acks(i).unwrap()).sum();
            assert_eq!(acks, (TASKS + CPUS) as u64);
        }
    }
}

#[test]
fn interrupt_protocol_wakes_every_waiter_exactly_once() {
    random_orders(false);
}

#[test]
fn legacy_protocol_wakes_every_waiter_exactly_once() {
    random_orders(true);
}

#[test]
fn sleepers_are_woken_after_they_queue() {
    let g = guest(SimHost::modern(), 4, false);
    let (done_tx, done_rx) = mpsc::channel();
    let handles: Vec<_> = (0..4)
        .map(|n| spawn_task(&g, n % CPUS, 0x4000 + n as u32, &done_tx))
        .collect();
    wait_until_waiting(&g, None, 4);
    for n in (0..4).rev() {
        assert_eq!(
            g.ready(n % CPUS, 0x4000 + n as u32),
            AsyncEvent::Woke(Wake::Woke(1))
        );
    }
    for (task, event) in await_all(&done_rx, 4) {
        assert_eq!(event, AsyncEvent::Slept);
        assert_eq!(g.sched.unblocked(task), 1);
    }
    handles.into_iter().for_each(|h| h.join().unwrap());
}

#[test]
fn wake_all_touches_only_the_current_cpu() {
    let g = guest(SimHost::modern(), 6, false);
    let (done_tx, done_rx) = mpsc::channel();
    let mut handles = Vec::new();
    for n in 0..6 {
        handles.push(spawn_task(&g, n % CPUS, 0x200 + n as u32, &done_tx));
    }
    wait_until_waiting(&g, None, 6);
    // A dummy of vCPU 0 and one of vCPU 1: wake-all discards only vCPU 0's.
    g.ready(0, 0x999);
    g.ready(1, 0x998);
    let event = g.ready(0, TOKEN_WAKE_ALL);
    let AsyncEvent::WokeAll(all) = event else {
        panic!("{event:?}")
    };
    assert_eq!((all.woken, all.dummies_freed), (3, 1));
    let first = await_all(&done_rx, 3);
    assert!(
        first
            .iter()
            .all(|&(task, e)| e == AsyncEvent::Slept && task % 2 == 0)
    );
    assert_eq!(g.apf.table().census(Some(1)), (3, 1), "vCPU 1 was touched");
    assert_eq!(g.apf.table().census(Some(0)), (0, 0));
    assert!(done_rx.recv_timeout(Duration::from_millis(50)).is_err());
    for n in [1, 3, 5] {
        assert_eq!(g.ready(1, 0x200 + n), AsyncEvent::Woke(Wake::Woke(1)));
    }
    await_all(&done_rx, 3);
    handles.into_iter().for_each(|h| h.join().unwrap());
    for task in 0..6 {
        assert_eq!(g.sched.unblocked(task), 1);
    }
}

#[test]
fn duplicates_and_unknown_tokens_leave_one_dummy_each() {
    let g = guest(SimHost::modern(), 1, false);
    ThreadSched::on_cpu(1);
    assert_eq!(g.ready(1, 7), AsyncEvent::Woke(Wake::DummyAdded));
    assert_eq!(g.ready(1, 7), AsyncEvent::Woke(Wake::AlreadyPending));
    assert_eq!(g.ready(1, 8), AsyncEvent::Woke(Wake::DummyAdded));
    assert_eq!(g.apf.table().census(Some(1)), (0, 2));
    // The fault for 7 consumes its dummy and does not sleep.
    g.sched.enter(1, true);
    assert_eq!(g.fault(1, 7), AsyncEvent::WakeCameFirst);
    assert_eq!(g.apf.table().census(None), (0, 1));
    // 8's fault never comes: wake-all of its CPU reclaims the dummy.
    let AsyncEvent::WokeAll(all) = g.ready(1, TOKEN_WAKE_ALL) else {
        panic!()
    };
    assert_eq!((all.woken, all.dummies_freed), (0, 1));
    assert_eq!(g.apf.table().dummies_in_use(), 0);
}

#[test]
fn a_wake_flood_cannot_grow_memory() {
    let g = guest(SimHost::modern(), 1, false);
    let before = std::mem::size_of_val(g.apf.table());
    let flood: u32 = if cfg!(miri) { 100 } else { 10_000 };
    for token in 1..=flood {
        g.ready(0, token);
    }
    assert_eq!(g.apf.table().dummies_in_use(), 8);
    assert_eq!(g.apf.table().dropped_wakes(), u64::from(flood) - 8);
    assert_eq!(std::mem::size_of_val(g.apf.table()), before);
    // The pool refills after a wake-all of the flooded CPU.
    ThreadSched::on_cpu(0);
    let all = g.apf.wake_all();
    assert_eq!(all.dummies_freed, 8);
    assert_eq!(g.ready(0, 5), AsyncEvent::Woke(Wake::DummyAdded));
}

#[test]
fn a_context_that_cannot_sleep_halt_polls() {
    let g = guest(SimHost::modern(), 1, false);
    let (done_tx, done_rx) = mpsc::channel();
    let g2 = g.clone();
    let h = thread::spawn(move || {
        let task = g2.sched.enter(0, false);
        done_tx.send((task, g2.fault(0, 0x77))).unwrap();
    });
    wait_until_waiting(&g, Some(0), 1);
    ThreadSched::on_cpu(1);
    assert_eq!(g.ready(0, 0x77), AsyncEvent::Woke(Wake::Woke(1)));
    let (task, event) = await_all(&done_rx, 1)[0];
    h.join().unwrap();
    assert_eq!(event, AsyncEvent::Slept);
    assert_eq!(
        g.sched.unblocked(task),
        0,
        "a halting context is kicked, not unblocked"
    );
    assert_eq!(g.sched.kicks.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn cpu_offline_disables_and_wakes_its_waiters() {
    let g = guest(SimHost::modern(), 2, false);
    let (done_tx, done_rx) = mpsc::channel();
    let handles: Vec<_> = (0..2)
        .map(|n| spawn_task(&g, n, 0x500 + n as u32, &done_tx))
        .collect();
    wait_until_waiting(&g, None, 2);
    let writes = g.host.enable_writes(1).unwrap();
    let all = g.apf.cpu_offline(&g.host.vcpu(1), &g.cpus[1], 1).unwrap();
    assert_eq!(all.woken, 1);
    assert_eq!(g.host.enable_writes(1).unwrap(), writes + 1);
    assert_eq!(g.host.enable_value(1).unwrap(), 0);
    assert_eq!(g.cpus[1].protocol(), None);
    assert_eq!(await_all(&done_rx, 1)[0].0, 1);
    assert_eq!(g.ready(0, 0x500), AsyncEvent::Woke(Wake::Woke(1)));
    await_all(&done_rx, 1);
    handles.into_iter().for_each(|h| h.join().unwrap());
    // Disabled: the host may not inject, and stale flags are no async PF.
    assert!(g.host.not_present(1, &g.cpus[1], 3).is_err());
    g.host.poke(&g.cpus[1], 1, 0);
    assert_eq!(
        g.apf.handle_page_fault(&g.cpus[1], 3),
        PfOutcome::NotAsyncPf
    );
    // Offline again (already disabled): no MSR write; nobody of CPU 1 is left to wake.
    let again = g.apf.cpu_offline(&g.host.vcpu(1), &g.cpus[1], 1).unwrap();
    assert_eq!((again.woken, again.dummies_freed), (0, 0));
    assert_eq!(g.host.enable_writes(1).unwrap(), writes + 1);
}

#[test]
fn a_wake_dropped_by_a_full_pool_never_leaves_its_wait_asleep() {
    // The pool (8 dummies) fills with wakes for faults still to come, then the wake of
    // token 100 finds no room. Its fault must not sleep forever.
    let g = guest(SimHost::modern(), 3, false);
    for token in 1..=8 {
        assert_eq!(g.ready(0, token), AsyncEvent::Woke(Wake::DummyAdded));
    }
    assert_eq!(g.ready(0, 100), AsyncEvent::Woke(Wake::Dropped));
    assert!(g.apf.table().wake_lost(0) && !g.apf.table().wake_lost(1));
    // Sleeping would wait for an unblock that never comes; the wait returns at once instead.
    let (done_tx, done_rx) = mpsc::channel();
    let h = spawn_task(&g, 0, 100, &done_tx);
    assert_eq!(await_all(&done_rx, 1)[0].1, AsyncEvent::ReturnedEarly);
    h.join().unwrap();
    // Dummies are still consumed as before.
    g.sched.enter(0, true);
    assert_eq!(g.fault(0, 3), AsyncEvent::WakeCameFirst);
    // A wake-all of CPU 0 ends the mark (and reclaims its dummies)...
    let AsyncEvent::WokeAll(all) = g.ready(0, TOKEN_WAKE_ALL) else {
        panic!("wake-all")
    };
    assert_eq!(all.dummies_freed, 7);
    assert!(!g.apf.table().wake_lost(0));
    // ...and faults sleep until their page ready again.
    let h = spawn_task(&g, 1, 0x900, &done_tx);
    wait_until_waiting(&g, Some(1), 1);
    assert_eq!(g.ready(1, 0x900), AsyncEvent::Woke(Wake::Woke(1)));
    assert_eq!(await_all(&done_rx, 1)[0].1, AsyncEvent::Slept);
    h.join().unwrap();
}

#[test]
fn a_modern_host_sends_a_wake_all_right_after_enable() {
    let host = SimHost::<1>::modern();
    let cpu = ApfCpu::new();
    let sched = ThreadSched::new(1);
    let apf: AsyncPf<SimVcpu<'_, 1>, &ThreadSched> = AsyncPf::new(&sched);
    // SAFETY: `cpu` outlives every use of the host in this test; sim addresses are virtual.
    unsafe {
        apf.enable_cpu(
            &host.vcpu(0),
            &cpu,
            cpu.area_addr() as u64,
            Config::new(VECTOR),
        )
    }
    .unwrap();
    // Queued before anything else: a page ready has to wait for it.
    assert_eq!(
        host.page_ready(0, &cpu, 5),
        Err(oskit_pv_apf::sim::SimError::SlotBusy)
    );
    assert_eq!(
        host.deliver_queued(0, &cpu),
        Ok(Some(Inject::Interrupt { vector: VECTOR }))
    );
    ThreadSched::on_cpu(0);
    let event = apf.handle_ready_interrupt(&host.vcpu(0), &cpu).unwrap();
    assert!(matches!(event, Some(AsyncEvent::WokeAll(_))), "{event:?}");
    assert_eq!(host.deliver_queued(0, &cpu), Ok(None));
    assert!(host.page_ready(0, &cpu, 5).is_ok());
}

#[test]
fn enable_programs_vector_then_area() {
    let g = guest(SimHost::modern(), 1, false);
    for (i, cpu) in g.cpus.iter().enumerate() {
        assert_eq!(
            g.host.enable_value(i).unwrap(),
            cpu.area_addr() as u64 | EN_ENABLED | EN_DELIVERY_AS_INT
        );
        assert_eq!(cpu.protocol(), Some(Protocol::Interrupt { vector: VECTOR }));
    }
    let legacy = guest(SimHost::kvm(oskit_pv_apf::KvmFeatures::ASYNC_PF), 1, false);
    assert_eq!(legacy.cpus[0].protocol(), Some(Protocol::PageFault));
    assert_eq!(
        legacy.host.enable_value(0).unwrap(),
        legacy.cpus[0].area_addr() as u64 | EN_ENABLED
    );
}

#[test]
fn interrupt_protocol_acks_even_a_spurious_interrupt_and_keeps_the_slot_rule() {
    let g = guest(SimHost::modern(), 1, false);
    let hw = g.host.vcpu(0);
    // (The first ACK was the enable's wake-all.)
    assert_eq!(g.host.acks(0).unwrap(), 1);
    assert_eq!(g.apf.handle_ready_interrupt(&hw, &g.cpus[0]), Ok(None));
    assert_eq!(g.host.acks(0).unwrap(), 2);
    // The host may not overwrite a token the guest has not consumed.
    g.host.page_ready(0, &g.cpus[0], 5).unwrap();
    assert_eq!(
        g.host.page_ready(0, &g.cpus[0], 6),
        Err(oskit_pv_apf::sim::SimError::SlotBusy)
    );
    ThreadSched::on_cpu(0);
    assert!(
        g.apf
            .handle_ready_interrupt(&hw, &g.cpus[0])
            .unwrap()
            .is_some()
    );
    assert_eq!(
        g.cpus[0]
            .area()
            .token
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    g.host.page_ready(0, &g.cpus[0], 6).unwrap();
}
