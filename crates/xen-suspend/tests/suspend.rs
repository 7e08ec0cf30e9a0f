//! Save/restore against the software Xen host.

mod common;

use common::*;
use oskit_xen_suspend::hal::{Hypervisor, RootState};
use oskit_xen_suspend::sim::{Fault, SimPageTables, SimPlan, Violations};
use oskit_xen_suspend::{Error, Outcome, Step};

struct World {
    host: Box<Host>,
    events: Box<Events>,
    roots: Vec<RootState>,
    bindings: Vec<Bound>,
}

fn world(seed: u64, nroots: usize) -> World {
    let host = Box::new(Host::new(CFG));
    let mut events = Box::new(Events::new());
    let bindings = bind_all(&host, &mut events);
    let roots = roots(nroots, &mut Rng(seed));
    World {
        host,
        events,
        roots,
        bindings,
    }
}

impl World {
    fn suspend(&mut self) -> Result<Outcome, Error> {
        let guest = self.host.guest();
        let mut pt = SimPageTables::new(guest, &mut self.roots);
        let mut ch = self.events.channels();
        pt.machine(guest).suspend(&mut ch)
    }

    fn audit(&mut self) -> Violations {
        let ch = self.events.channels();
        self.host.audit(&ch, &self.roots)
    }
}

fn store_pfn() -> u64 {
    CFG.nr_pages - 2
}

fn console_pfn() -> u64 {
    CFG.nr_pages - 1
}

#[test]
fn restore_in_new_domain_rebinds_every_virq_and_ipi() {
    let mut w = world(1, 64);
    let pinned_before: Vec<bool> = w.roots.iter().map(|r| r.pinned).collect();
    assert!(pinned_before.iter().any(|p| !p), "want some unpinned roots");
    let old_ports = assert_delivers(&w.host, &mut w.events, &w.bindings);
    let old_si = w.host.start_info();

    assert_eq!(w.suspend(), Ok(Outcome::Resumed));

    assert_eq!(w.host.generation(), 1);
    assert_eq!(w.host.hypercall_violations(), Violations::NONE);
    let audit = w.audit();
    assert!(
        audit.is_empty(),
        "audit: {:?}",
        audit.names().collect::<Vec<_>>()
    );
    let new_ports = assert_delivers(&w.host, &mut w.events, &w.bindings);
    for (old, new) in old_ports.iter().zip(&new_ports) {
        assert_ne!(old, new, "a port number survived the restore");
    }
    // Every frame reference is the new domain's.
    let si = w.host.start_info();
    assert_eq!(Some(si.store_mfn), w.host.mfn_of(store_pfn()));
    assert_eq!(Some(si.console_mfn), w.host.mfn_of(console_pfn()));
    assert_ne!(si.store_mfn, old_si.store_mfn);
    assert_ne!(si.console_mfn, old_si.console_mfn);
    assert_ne!(si.shared_info, old_si.shared_info);
    // Roots: pinned exactly as before, none left marked, Xen agrees.
    let pinned_after: Vec<bool> = w.roots.iter().map(|r| r.pinned).collect();
    assert_eq!(pinned_after, pinned_before);
    assert!(w.roots.iter().all(|r| !r.save_pinned));
    assert_eq!(
        w.host.pinned_roots(),
        pinned_before.iter().filter(|p| **p).count()
    );
    assert_eq!(w.host.cpu_map_resets(), 1);
    assert_eq!(w.host.bound_ports(), w.bindings.len());

    // And again, from the new domain.
    assert_eq!(w.suspend(), Ok(Outcome::Resumed));
    assert_eq!(w.host.generation(), 2);
    assert!(w.audit().is_empty());
    let third = assert_delivers(&w.host, &mut w.events, &w.bindings);
    for (a, b) in new_ports.iter().zip(&third) {
        assert_ne!(a, b);
    }
}

#[test]
fn cancelled_suspend_leaves_frames_and_bindings_untouched() {
    let mut w = world(2, 32);
    w.host.set_plan(SimPlan::Cancel);
    let roots_before = w.roots.clone();
    let si_before = w.host.start_info();
    let ports_before: Vec<_> = (0..PORTS as u32).map(|p| w.host.port(p)).collect();

    assert_eq!(w.suspend(), Ok(Outcome::Cancelled));

    assert_eq!(w.host.hypercalls(), 1);
    assert_eq!(w.host.hypercall_violations(), Violations::NONE);
    assert_eq!(w.host.generation(), 0);
    assert_eq!(w.host.start_info(), si_before);
    let ports_after: Vec<_> = (0..PORTS as u32).map(|p| w.host.port(p)).collect();
    assert_eq!(ports_after, ports_before);
    assert_eq!(w.roots, roots_before);
    assert_eq!(w.host.cpu_map_resets(), 0);
    assert!(w.audit().is_empty());
    let ports = assert_delivers(&w.host, &mut w.events, &w.bindings);
    let recorded: Vec<_> = w.bindings.iter().map(|b| b.port).collect();
    assert_eq!(ports, recorded);
}

/// Violations an audit must find after a fault at `fault` fired (the rest stay clean).
fn expected_audit(fault: Fault) -> Violations {
    match fault {
        Fault::SetupSharedInfo => Violations::SHARED_INFO_STALE,
        Fault::GrantResume => Violations::GRANTS_STALE,
        Fault::Unpin => Violations::ROOT_SAVE_PINNED,
        Fault::BindVirq | Fault::BindIpi | Fault::Unmask => Violations::BINDING_STALE,
        Fault::ConsoleResume => Violations::CONSOLE_STALE,
        Fault::Delivery => Violations::DELIVERY_STALE,
        _ => Violations::NONE,
    }
}

fn before_hypercall(fault: Fault) -> bool {
    matches!(
        fault,
        Fault::Freeze
            | Fault::DeviceSuspend
            | Fault::StopMachine
            | Fault::Pin
            | Fault::GrantSuspend
            | Fault::UpdateVaMapping
            | Fault::Hypercall
    )
}

fn run_fault(fault: Fault, nth: u32, plan: SimPlan) {
    let mut w = world(u64::from(nth) * 31 + fault as u64 + 7, 24);
    w.host.set_plan(plan);
    let si_before = w.host.start_info();
    w.host.set_faults(&[(fault, nth)]);
    let result = w.suspend();
    let ctx = format!("{fault:?} #{nth} {plan:?}: {result:?}");
    assert_eq!(w.host.hypercall_violations(), Violations::NONE, "{ctx}");

    let Some(fired) = w.host.fired() else {
        // Fewer calls than `nth`: nothing failed.
        assert!(w.host.calls(fault) < nth, "{ctx}");
        assert!(result.is_ok(), "{ctx}");
        assert!(w.audit().is_empty(), "{ctx}");
        return;
    };
    assert_eq!(fired, fault, "{ctx}");
    let outcome = if before_hypercall(fault) {
        Outcome::NotSuspended
    } else if plan == SimPlan::Cancel {
        Outcome::Cancelled
    } else {
        Outcome::Resumed
    };
    assert_eq!(
        result,
        Err(Error::Suspend {
            step: fault.step(),
            errno: fault.errno(),
            outcome
        }),
        "{ctx}"
    );
    // Never half-suspended: thawed, devices, xenbus, time, CPUs back; only the failed
    // piece's own state is off.
    let audit = w.audit();
    assert_eq!(
        audit,
        expected_audit(fault),
        "{ctx}: {:?}",
        audit.names().collect::<Vec<_>>()
    );
    if outcome != Outcome::Resumed {
        assert_eq!(w.host.generation(), 0, "{ctx}");
        assert_eq!(w.host.start_info(), si_before, "{ctx}");
        assert_delivers(&w.host, &mut w.events, &w.bindings);
    } else if !matches!(
        fault,
        Fault::BindVirq | Fault::BindIpi | Fault::Unmask | Fault::Delivery
    ) {
        assert_delivers(&w.host, &mut w.events, &w.bindings);
    }
}

#[test]
fn a_fault_at_any_step_ends_running_and_thawed_with_that_error() {
    // Miri interprets every instruction: fewer schedules there, the same checks.
    let nths: &[u32] = if cfg!(miri) {
        &[1, 3]
    } else {
        &[1, 2, 3, 7, 40]
    };
    for fault in Fault::ALL {
        for &nth in nths {
            run_fault(fault, nth, SimPlan::Resume);
            run_fault(fault, nth, SimPlan::Cancel);
        }
    }
}

#[test]
fn a_failed_rebind_leaves_only_that_binding_dead() {
    let mut w = world(9, 8);
    w.host.set_faults(&[(Fault::BindIpi, 4)]);
    let r = w.suspend();
    assert!(
        matches!(
            r,
            Err(Error::Suspend {
                step: Step::Rebind,
                outcome: Outcome::Resumed,
                ..
            })
        ),
        "{r:?}"
    );
    let dead: Vec<u32> = {
        let ch = w.events.channels();
        w.bindings
            .iter()
            .filter(|b| ch.info(b.irq).unwrap().port == 0)
            .map(|b| b.irq)
            .collect()
    };
    assert_eq!(dead.len(), 1, "exactly the failed binding has no port");
    let live: Vec<_> = w
        .bindings
        .iter()
        .copied()
        .filter(|b| !dead.contains(&b.irq))
        .collect();
    assert_delivers(&w.host, &mut w.events, &live);
    // The next restore binds it again.
    w.host.set_faults(&[]);
    assert_eq!(w.suspend(), Ok(Outcome::Resumed));
    assert!(w.audit().is_empty());
    assert_delivers(&w.host, &mut w.events, &w.bindings);
}

#[test]
fn fewer_grant_frames_in_the_new_domain_fail_grant_resume() {
    let mut w = world(3, 8);
    w.host.set_next_max_grant_frames(CFG.grant_frames - 1);
    assert_eq!(
        w.suspend(),
        Err(Error::Suspend {
            step: Step::GrantResume,
            errno: 38,
            outcome: Outcome::Resumed
        })
    );
    assert_eq!(w.audit(), Violations::GRANTS_STALE);
    assert_delivers(&w.host, &mut w.events, &w.bindings);
}

#[test]
fn an_mfn_not_of_this_domain_in_start_info_aborts_before_the_hypercall() {
    let mut w = world(4, 8);
    w.host.with_start_info(|si| si.console_mfn = 0xdead_beef);
    let before = w.host.start_info();
    assert_eq!(
        w.suspend(),
        Err(Error::Suspend {
            step: Step::PreSuspend,
            errno: 22,
            outcome: Outcome::NotSuspended
        })
    );
    assert_eq!(w.host.hypercalls(), 0);
    assert_eq!(w.host.start_info(), before);
    assert!(w.roots.iter().all(|r| !r.save_pinned));
}

#[test]
fn the_host_reports_each_violation_of_a_careless_guest() {
    let mut w = world(5, 8);
    // Suspending straight from a running CPU: every check must fire.
    let mut hv = w.host.guest();
    let guest = w.host.guest();
    let _pt = SimPageTables::new(guest, &mut w.roots);
    assert_eq!(
        hv.suspend(),
        Ok(oskit_xen_suspend::hal::SuspendResult::Cancelled)
    );
    let v = w.host.hypercall_violations();
    for expected in [
        Violations::NOT_CPU0,
        Violations::IRQS_ENABLED,
        Violations::CPUS_RUNNING,
        Violations::ROOT_UNPINNED,
        Violations::USER_ROOT_LOADED,
        Violations::STORE_NOT_CANONICAL,
        Violations::CONSOLE_NOT_CANONICAL,
        Violations::SHARED_INFO_MAPPED,
        Violations::SHARED_INFO_IN_USE,
        Violations::GRANTS_MAPPED,
        Violations::TASKS_RUNNING,
        Violations::DEVICES_RUNNING,
        Violations::XENBUS_RUNNING,
        Violations::TIME_RUNNING,
    ] {
        assert!(v.contains(expected), "{:?} missing from {:?}", expected, v);
    }
    assert_eq!(
        w.host.generation(),
        0,
        "a refused save does not move the domain"
    );
}

#[test]
fn random_worlds_restore_cleanly() {
    let mut rng = Rng(0x5eed);
    for _ in 0..if cfg!(miri) { 3 } else { 20 } {
        let mut w = world(rng.next() | 1, rng.below(100) as usize);
        let cycles = 1 + rng.below(4);
        for _ in 0..cycles {
            let plan = if rng.below(3) == 0 {
                SimPlan::Cancel
            } else {
                SimPlan::Resume
            };
            w.host.set_plan(plan);
            let expected = match plan {
                SimPlan::Cancel => Outcome::Cancelled,
                SimPlan::Resume => Outcome::Resumed,
            };
            assert_eq!(w.suspend(), Ok(expected));
            assert!(w.audit().is_empty());
            assert_delivers(&w.host, &mut w.events, &w.bindings);
        }
        assert_eq!(w.host.hypercall_violations(), Violations::NONE);
    }
}

#[test]
fn a_tiny_single_cpu_domain_in_fixed_storage_restores() {
    use oskit_xen_suspend::EventStorage;
    use oskit_xen_suspend::abi::virq;
    use oskit_xen_suspend::sim::{SimConfig, SimXen};
    let host = SimXen::<1, 12>::new(SimConfig {
        nr_pages: 16,
        grant_frames: 1,
        max_grant_frames: 1,
    });
    let mut events = EventStorage::<1, 2, 12>::new();
    let mut hv = host.guest();
    let timer = events
        .channels()
        .bind_virq(&mut hv, virq::TIMER, 0)
        .unwrap();
    let ipi = events.channels().bind_ipi(&mut hv, 0, 0).unwrap();
    let mut roots = [RootState::default(); 3];
    for round in 1..=3 {
        let guest = host.guest();
        let mut pt = SimPageTables::new(guest, &mut roots);
        assert_eq!(
            pt.machine(guest).suspend(&mut events.channels()),
            Ok(Outcome::Resumed)
        );
        assert_eq!(host.generation(), round);
        let ch = events.channels();
        assert!(host.audit(&ch, &roots).is_empty());
        let port = host.raise_virq(0, virq::TIMER).unwrap();
        assert_eq!(ch.irq_for_port(port), Some(timer));
        assert_eq!(host.send_ipi(ch.info(ipi).unwrap().port), Some(0));
    }
    assert_eq!(host.hypercall_violations(), Violations::NONE);
}

/// Host calls of one suspend + resume in a world of `CPUS` vCPUs (4 VIRQs and 4 IPIs each)
/// and `roots` roots, half of them unpinned.
fn calls_per_cycle<const CPUS: usize, const PORTS: usize>(roots: usize) -> [u32; 5] {
    use oskit_xen_suspend::EventStorage;
    use oskit_xen_suspend::sim::{SimConfig, SimXen};
    let host = Box::new(SimXen::<CPUS, PORTS>::new(SimConfig::default()));
    let mut events = Box::new(EventStorage::<CPUS, 256, PORTS>::new());
    let mut hv = host.guest();
    for cpu in 0..CPUS as u32 {
        // The four per-vCPU VIRQs (global ones bind only on vCPU 0).
        for (i, v) in [0, 1, 7, 13].into_iter().enumerate() {
            events.channels().bind_virq(&mut hv, v, cpu).unwrap();
            events.channels().bind_ipi(&mut hv, i as u32, cpu).unwrap();
        }
    }
    let mut roots: Vec<RootState> = (0..roots)
        .map(|i| RootState {
            pinned: i % 2 == 0,
            save_pinned: false,
        })
        .collect();
    host.set_faults(&[]);
    let guest = host.guest();
    let mut pt = SimPageTables::new(guest, &mut roots);
    assert_eq!(
        pt.machine(guest).suspend(&mut events.channels()),
        Ok(Outcome::Resumed)
    );
    [
        Fault::Pin,
        Fault::Unpin,
        Fault::BindVirq,
        Fault::BindIpi,
        Fault::Unmask,
    ]
    .map(|f| host.calls(f))
}

#[test]
fn twice_the_cpus_ports_and_roots_is_exactly_twice_the_hypervisor_work() {
    let one = calls_per_cycle::<8, 256>(1000);
    let two = calls_per_cycle::<16, 512>(2000);
    assert_eq!(one, [500, 500, 32, 32, 64]);
    assert_eq!(two, one.map(|n| 2 * n));
}
