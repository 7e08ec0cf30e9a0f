//! Suspend + resume against the software host: 64 vCPUs, 1,024 bound ports, 10,000 page-table
//! roots (in the 2-level ABI's 4,096 ports), and twice all of that (8,192 ports, as the FIFO
//! ABI allows) to show the cost grows linearly. `floor` issues the same host
//! operations (mask sweep, binds, unmasks, pins, unpins) without the orchestration around them.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use oskit_xen_suspend::EventStorage;
use oskit_xen_suspend::abi::virq;
use oskit_xen_suspend::events::NR_IPIS;
use oskit_xen_suspend::hal::{Hypervisor, PageTables, RootState};
use oskit_xen_suspend::sim::{SimConfig, SimPageTables, SimPlan, SimXen};

/// VIRQs bound per vCPU (plus `NR_IPIS` IPIs): 16 ports per vCPU.
const VIRQS: [u32; 8] = [
    virq::TIMER,
    virq::DEBUG,
    virq::CONSOLE,
    virq::XENOPROF,
    virq::CON_RING,
    virq::XENPMU,
    virq::ARCH_0,
    virq::ARCH_0 + 1,
];

struct World<const CPUS: usize, const IRQS: usize, const PORTS: usize> {
    host: Box<SimXen<CPUS, PORTS>>,
    events: Box<EventStorage<CPUS, IRQS, PORTS>>,
    roots: Vec<RootState>,
}

fn world<const CPUS: usize, const IRQS: usize, const PORTS: usize>(
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
    assert_eq!(host.bound_ports(), CPUS * 16);
    // Every other root is unpinned (being built or torn down): pinned for the save.
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

fn cycle<const CPUS: usize, const IRQS: usize, const PORTS: usize>(
    w: &mut World<CPUS, IRQS, PORTS>,
) {
    let guest = w.host.guest();
    let mut pt = SimPageTables::new(guest, &mut w.roots);
    let mut ch = w.events.channels();
    let r = pt.machine(guest).suspend(&mut ch);
    r.expect("suspend");
}

fn floor<const CPUS: usize, const IRQS: usize, const PORTS: usize>(
    w: &mut World<CPUS, IRQS, PORTS>,
) {
    let guest = w.host.guest();
    let mut hv = guest;
    {
        let mut pt = SimPageTables::new(guest, &mut w.roots);
        for i in (1..pt.root_count()).step_by(2) {
            pt.pin(i).unwrap();
        }
        for i in (1..pt.root_count()).step_by(2) {
            pt.unpin(i).unwrap();
        }
    }
    for p in 0..PORTS as u32 {
        hv.mask(p);
    }
    // The same number of binds and unmasks (the host refuses a second binding of a VIRQ, so
    // rebind after a cancelled suspend keeps the old ports: the floor measures the calls).
    let ch = w.events.channels();
    for (_, info) in ch.bindings() {
        black_box(hv.unmask(info.port)).unwrap();
        black_box(hv.bind_ipi(info.cpu).ok());
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("suspend_resume");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));

    let mut w1 = world::<64, 1024, 4096>(10_000);
    g.bench_function(
        BenchmarkId::new("oskit", "64vcpu-1024ports-10000roots"),
        |b| b.iter(|| cycle(&mut w1)),
    );
    let mut w2 = world::<128, 2048, 8192>(20_000);
    g.bench_function(
        BenchmarkId::new("oskit", "128vcpu-2048ports-20000roots"),
        |b| b.iter(|| cycle(&mut w2)),
    );

    g.bench_function(
        BenchmarkId::new("floor-host-calls-only", "64vcpu-1024ports-10000roots"),
        |b| {
            b.iter_batched_ref(
                || world::<64, 1024, 4096>(10_000),
                floor,
                criterion::BatchSize::LargeInput,
            )
        },
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
