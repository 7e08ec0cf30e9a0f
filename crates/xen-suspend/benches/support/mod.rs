//! The benchmark's world (a host, an event table with every binding made, page-table roots) and
//! one suspend + resume cycle, shared by `benches/suspend.rs` and `examples/icount.rs` so that
//! callgrind counts exactly what criterion times.
#![allow(dead_code, unreachable_pub)]

use oskit_xen_suspend::EventStorage;
use oskit_xen_suspend::abi::virq;
use oskit_xen_suspend::events::NR_IPIS;
use oskit_xen_suspend::hal::RootState;
use oskit_xen_suspend::sim::{SimConfig, SimPageTables, SimPlan, SimXen};

/// VIRQs bound per vCPU, the four per-vCPU ones (global VIRQs bind only on vCPU 0), plus
/// `NR_IPIS` IPIs: 12 ports per vCPU.
pub const VIRQS: [u32; 4] = [virq::TIMER, virq::DEBUG, virq::XENOPROF, virq::XENPMU];

/// A host with `CPUS` vCPUs and `PORTS` ports, every VIRQ of [`VIRQS`] and every IPI bound on
/// every vCPU, and the guest's roots.
pub struct World<const CPUS: usize, const IRQS: usize, const PORTS: usize> {
    pub host: Box<SimXen<CPUS, PORTS>>,
    pub events: Box<EventStorage<CPUS, IRQS, PORTS>>,
    pub roots: Vec<RootState>,
}

/// The world with `nroots` roots, every other one unpinned (being built or torn down), so
/// half of them are pinned for the save. Every suspend restores into a new domain.
pub fn world<const CPUS: usize, const IRQS: usize, const PORTS: usize>(
    nroots: usize,
) -> World<CPUS, IRQS, PORTS> {
    let host = Box::new(SimXen::<CPUS, PORTS>::new(SimConfig::default()));
    let mut events = Box::new(EventStorage::<CPUS, IRQS, PORTS>::new());
    let mut hv = host.guest();
    let mut ch = events.channels();
    for cpu in 0..CPUS as u32 {
        for v in VIRQS {
            ch.bind_virq(&mut hv, v, cpu).unwrap();
        }
        for ipi in 0..NR_IPIS as u32 {
            ch.bind_ipi(&mut hv, ipi, cpu).unwrap();
        }
    }
    assert_eq!(host.bound_ports(), CPUS * 12);
    let roots = (0..nroots)
        .map(|i| RootState {
            pinned: i % 2 == 0,
            save_pinned: false,
        })
        .collect();
    host.set_plan(SimPlan::Resume);
    World {
        host,
        events,
        roots,
    }
}

/// One suspend + resume into a new domain.
pub fn cycle<const CPUS: usize, const IRQS: usize, const PORTS: usize>(
    w: &mut World<CPUS, IRQS, PORTS>,
) {
    let guest = w.host.guest();
    let mut pt = SimPageTables::new(guest, &mut w.roots);
    let mut ch = w.events.channels();
    let r = pt.machine(guest).suspend(&mut ch);
    r.expect("suspend");
}
