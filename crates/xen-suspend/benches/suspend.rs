//! Suspend + resume against the software host: 64 vCPUs, 1,024 bound ports, 10,000 page-table
//! roots (in the 2-level ABI's 4,096 ports), and twice all of that to show the cost grows
//! linearly. `floor` issues the same host operations (mask sweep, binds, unmasks, pins, unpins)
//! without the orchestration around them.
//!
//! The doubled world doubles the port space too (8,192 ports, as the FIFO ABI allows): the mask
//! sweep covers the whole space, so the space is part of the work, and the model cannot hold
//! 2,048 bindings in 4,096 ports across a restore (it keeps the old domain's ports taken so
//! that every number changes: 2 × 2,048 + 3 > 4,096, the rebind fails with ENOSPC). Per port
//! and per root both worlds do the same thing: `examples/icount.rs` runs this very cycle under
//! callgrind (see the README).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use oskit_xen_suspend::hal::{Hypervisor, PageTables};
use oskit_xen_suspend::sim::SimPageTables;

mod support;
use support::{World, cycle, world};

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
        BenchmarkId::new("oskit", "64vcpu-768ports-10000roots"),
        |b| b.iter(|| cycle(&mut w1)),
    );
    let mut w2 = world::<128, 2048, 8192>(20_000);
    g.bench_function(
        BenchmarkId::new("oskit", "128vcpu-1536ports-20000roots"),
        |b| b.iter(|| cycle(&mut w2)),
    );

    g.bench_function(
        BenchmarkId::new("floor-host-calls-only", "64vcpu-768ports-10000roots"),
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
