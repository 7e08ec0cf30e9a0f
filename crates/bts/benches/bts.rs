//! Drain of 65,536 records vs a plain copy of the same bytes; `read(index)`; the cost of the
//! context-switch hooks.

use std::{hint::black_box, time::Duration};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use oskit_bts::{Bts, BtsCpu, Config, Flags, Record, format::RECORD_SIZE, sim::SoftCpu};

mod support;

use support::{Alloc, Ignore, RECORDS, Space, Task, Tracer, Work, fill, traced};

fn drain(c: &mut Criterion) {
    let mut g = c.benchmark_group("drain_65536");
    g.throughput(criterion::Throughput::Bytes((RECORDS * RECORD_SIZE) as u64));
    let (bts, task, mut cpu) = traced(Flags::TRACE, RECORDS);
    let mut out = vec![Record::Invalid; RECORDS];
    g.bench_function("oskit-drain", |b| {
        b.iter_batched(
            || fill(&bts, &task, &mut cpu, RECORDS),
            |()| assert_eq!(bts.drain(&task, black_box(&mut out)), Ok(RECORDS)),
            BatchSize::PerIteration,
        )
    });
    let src = vec![0x5au8; RECORDS * RECORD_SIZE];
    let mut dst = vec![0u8; RECORDS * RECORD_SIZE];
    g.bench_function("plain_copy", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&src)))
    });
    g.finish();
}

fn read(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_index");
    let (bts, task, mut cpu) = traced(Flags::TRACE, RECORDS);
    fill(&bts, &task, &mut cpu, RECORDS + 100); // wrapped
    g.bench_function("oskit-read-newest", |b| {
        b.iter(|| bts.read(&task, black_box(0)).unwrap())
    });
    g.bench_function("oskit-read-oldest", |b| {
        b.iter(|| bts.read(&task, black_box(RECORDS - 1)).unwrap())
    });
    g.finish();
}

fn switch(c: &mut Criterion) {
    let mut g = c.benchmark_group("context_switch_out_in");
    // Nothing traced anywhere: the fast path.
    let bts: Tracer = Bts::new(Alloc, Work);
    let mut cpu = BtsCpu::new(SoftCpu::default());
    let other = Task(2);
    g.bench_function("oskit-no-contexts", |b| {
        b.iter(|| {
            bts.switch_out(&mut cpu, 0, &mut Ignore, &mut Ignore)
                .unwrap();
            bts.switch_in(&mut cpu, black_box(&other), 0, &mut Ignore, &mut Ignore)
                .unwrap();
        })
    });
    for (name, flags) in [
        ("traced", Flags::TRACE),
        ("traced_sched", Flags::TRACE | Flags::SCHED),
    ] {
        // 63 other contexts first, so the lookup of the traced task scans the whole table.
        let bts: Tracer = Bts::new(Alloc, Work);
        for pid in 10..73 {
            let cfg = Config {
                size: RECORD_SIZE,
                flags: Flags::ALLOC,
                signal: 0,
            };
            bts.config(&Task(pid), &Space, cfg).unwrap();
        }
        let task = Task(1);
        let cfg = Config {
            size: 1024 * RECORD_SIZE,
            flags: flags | Flags::ALLOC,
            signal: 0,
        };
        bts.config(&task, &Space, cfg).unwrap();
        let mut cpu = BtsCpu::new(SoftCpu::default());
        g.bench_function(format!("oskit-{name}"), |b| {
            b.iter(|| {
                bts.switch_out(&mut cpu, 1, &mut Ignore, &mut Ignore)
                    .unwrap();
                bts.switch_in(&mut cpu, black_box(&task), 2, &mut Ignore, &mut Ignore)
                    .unwrap();
            })
        });
        g.bench_function(format!("oskit-untraced-task-{name}-table"), |b| {
            b.iter(|| {
                bts.switch_out(&mut cpu, 1, &mut Ignore, &mut Ignore)
                    .unwrap();
                bts.switch_in(&mut cpu, black_box(&other), 2, &mut Ignore, &mut Ignore)
                    .unwrap();
            })
        });
        bts.switch_out(&mut cpu, 3, &mut Ignore, &mut Ignore)
            .unwrap();
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = drain, read, switch
}
criterion_main!(benches);
