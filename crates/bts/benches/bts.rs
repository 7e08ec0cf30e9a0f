//! Drain of 65,536 records vs a plain copy of the same bytes; `read(index)`; the cost of the
//! context-switch hooks.

use std::{alloc::Layout, hint::black_box, ptr::NonNull, time::Duration};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use oskit_bts::{
    Bts, BtsCpu, Config, Flags, Record,
    format::RECORD_SIZE,
    hal::{AddressSpace, DeferredWork, LockedAlloc, PAGE_SIZE, TaskRef},
    sim::SoftCpu,
};

#[derive(Clone)]
struct Task(u32);
impl TaskRef for Task {
    fn pid(&self) -> u32 {
        self.0
    }
}
#[derive(Clone)]
struct Space;
impl AddressSpace for Space {
    fn charge_locked(&self, _: usize) -> bool {
        true
    }
    fn refund_locked(&self, _: usize) {}
}
struct Alloc;
// SAFETY: fresh page-aligned allocations, freed with the same layout.
unsafe impl LockedAlloc for Alloc {
    fn alloc_pages(&self, pages: usize) -> Option<NonNull<u8>> {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).ok()?;
        // SAFETY: non-zero size.
        NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
    }
    unsafe fn free_pages(&self, ptr: NonNull<u8>, pages: usize) {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap();
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) }
    }
}
struct Work;
impl DeferredWork for Work {
    fn schedule(&self) {}
}

type Tracer = Bts<Task, Space, Alloc, Work, 64>;
const RECORDS: usize = 65_536;

fn traced(flags: Flags, records: usize) -> (Tracer, Task, BtsCpu<SoftCpu>) {
    let bts = Bts::new(Alloc, Work);
    let task = Task(1);
    let cfg = Config {
        size: records * RECORD_SIZE,
        flags: flags | Flags::ALLOC,
        signal: 0,
    };
    bts.config(&task, &Space, cfg).unwrap();
    (bts, task, BtsCpu::new(SoftCpu::default()))
}

fn fill(bts: &Tracer, task: &Task, cpu: &mut BtsCpu<SoftCpu>, n: usize) {
    bts.switch_in(cpu, task, 0);
    for i in 0..n as u64 {
        cpu.hw_mut()
            .branch(0x40_0000 + i, 0x50_0000 + i, i & 1 == 0);
    }
    bts.switch_out(cpu, 0);
}

fn drain(c: &mut Criterion) {
    let mut g = c.benchmark_group("drain_65536");
    g.throughput(criterion::Throughput::Bytes((RECORDS * RECORD_SIZE) as u64));
    let (bts, task, mut cpu) = traced(Flags::TRACE, RECORDS);
    let mut out = vec![Record::Invalid; RECORDS];
    g.bench_function("bts_drain", |b| {
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
    g.bench_function("newest", |b| {
        b.iter(|| bts.read(&task, black_box(0)).unwrap())
    });
    g.bench_function("oldest", |b| {
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
    g.bench_function("no_contexts", |b| {
        b.iter(|| {
            bts.switch_out(&mut cpu, 0);
            bts.switch_in(&mut cpu, black_box(&other), 0);
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
        g.bench_function(name, |b| {
            b.iter(|| {
                bts.switch_out(&mut cpu, 1);
                bts.switch_in(&mut cpu, black_box(&task), 2);
            })
        });
        g.bench_function(format!("untraced_task_{name}_table"), |b| {
            b.iter(|| {
                bts.switch_out(&mut cpu, 1);
                bts.switch_in(&mut cpu, black_box(&other), 2);
            })
        });
        bts.switch_out(&mut cpu, 3);
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
