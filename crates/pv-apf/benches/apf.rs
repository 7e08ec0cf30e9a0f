//! Benchmarks: the hook on the ordinary fault path, a wait+wake round trip, and wake
//! throughput from two threads.
//!
//! `cargo bench -p oskit-pv-apf` (add `-- --quick` for a smoke run). The `fault_hook` group
//! also prints the machine code of the three fault-path variants, disassembled from this very
//! binary with `objdump`, with their instruction counts.

use std::{
    hint::black_box,
    sync::{
        Barrier,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use oskit_pv_apf::{ApfCpu, Config, SleepTable, WaitNode, Waiter};

mod support;

use support::*;

/// Prints the handler variants' code from this binary (the evidence for "zero cost").
fn print_generated_code() {
    type Handler = fn(&ApfCpu, u64) -> u64;
    let handlers: [(&str, Handler); 6] = [
        ("pv_apf_bench_fault_no_hook", pv_apf_bench_fault_no_hook),
        (
            "pv_apf_bench_fault_native_hook",
            pv_apf_bench_fault_native_hook,
        ),
        (
            "pv_apf_bench_fault_runtime_hook",
            pv_apf_bench_fault_runtime_hook,
        ),
        ("pv_apf_bench_tail_no_hook", pv_apf_bench_tail_no_hook),
        (
            "pv_apf_bench_tail_native_hook",
            pv_apf_bench_tail_native_hook,
        ),
        (
            "pv_apf_bench_tail_runtime_hook",
            pv_apf_bench_tail_runtime_hook,
        ),
    ];
    for (sym, f) in handlers {
        println!("{sym} at {:#x}", f as usize);
    }
    for pair in [[0, 1], [3, 4]] {
        let [(no, a), (native, b)] = pair.map(|i| handlers[i]);
        if a as usize == b as usize {
            println!("{no} and {native} are one function: identical machine code, merged");
        }
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    for (sym, _) in handlers {
        let out = std::process::Command::new("objdump")
            .args(["-d", "--no-show-raw-insn", "-M", "intel"])
            .arg(format!("--disassemble={sym}"))
            .arg(&exe)
            .output();
        let Some(out) = out.ok().filter(|o| o.status.success()) else {
            println!("{sym}: skipped: objdump not available");
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let insns: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("  ") && l.contains(":\t"))
            .map(|l| l.split(":\t").nth(1).unwrap_or("").trim())
            .collect();
        println!("{sym}: {} instructions: {}", insns.len(), insns.join(" ; "));
    }
}

fn fault_hook(c: &mut Criterion) {
    print_generated_code();
    // SAFETY: CPU_ON is a static; the sim's physical addresses are virtual ones.
    unsafe {
        RUNTIME
            .enable_cpu(
                &HOST.vcpu(0),
                &CPU_ON,
                CPU_ON.area_addr() as u64,
                Config::new(0xec),
            )
            .expect("enable");
    }
    let mut g = c.benchmark_group("fault_hook");
    g.throughput(Throughput::Elements(1));
    g.bench_function("no_hook", |b| {
        b.iter(|| pv_apf_bench_fault_no_hook(black_box(&CPU_OFF), black_box(0x1000)))
    });
    g.bench_function("oskit-native-hook", |b| {
        b.iter(|| pv_apf_bench_fault_native_hook(black_box(&CPU_OFF), black_box(0x1000)))
    });
    g.bench_function("oskit-runtime-hook-off", |b| {
        b.iter(|| pv_apf_bench_fault_runtime_hook(black_box(&CPU_OFF), black_box(0x1000)))
    });
    g.bench_function("oskit-runtime-hook-on", |b| {
        b.iter(|| pv_apf_bench_fault_runtime_hook(black_box(&CPU_ON), black_box(0x1000)))
    });
    g.finish();
}

fn wait_wake(c: &mut Criterion) {
    let mut g = c.benchmark_group("wait_wake");
    g.throughput(Throughput::Elements(1));
    // The wake comes first: a dummy is left and consumed (two bucket-lock round trips).
    let mut token = 0u32;
    g.bench_function("oskit-wake-then-wait", |b| {
        b.iter(|| {
            token = token.wrapping_add(1) & 0x7fff_ffff;
            RUNTIME.wake(token);
            RUNTIME.wait(token)
        })
    });
    // A task really sleeps and another thread wakes it (park/unpark: the scheduler's cost).
    g.bench_function("oskit-sleep-then-wake-2-threads", |b| {
        b.iter_custom(|iters| {
            let done = AtomicU64::new(0);
            thread::scope(|s| {
                let waiter = s.spawn(|| {
                    for i in 0..iters {
                        RUNTIME.wait(0x8000_0000 | i as u32);
                        done.store(i + 1, Ordering::Release);
                    }
                });
                *WAITER.lock().unwrap() = Some(waiter.thread().clone());
                let start = Instant::now();
                for i in 0..iters {
                    RUNTIME.wake(0x8000_0000 | i as u32);
                    // Stay within the dummy pool.
                    while done.load(Ordering::Acquire) + 32 < i {
                        std::hint::spin_loop();
                    }
                }
                while done.load(Ordering::Acquire) < iters {
                    std::hint::spin_loop();
                }
                start.elapsed()
            })
        })
    });
    g.finish();
}

const PER_THREAD: usize = 1024;

/// Two threads each wake `PER_THREAD` queued waiters (distinct tokens) at once.
fn wake_burst<const B: usize>(iters: u64) -> Duration {
    let table = SleepTable::<u32, 64, B>::new();
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let nodes: Vec<_> = (0..2 * PER_THREAD as u32)
            .map(|t| Box::pin(WaitNode::new(&table, t, 0, Waiter::Task(t))))
            .collect();
        for n in &nodes {
            n.as_ref().enqueue();
        }
        let barrier = Barrier::new(2);
        let times: Vec<Duration> = thread::scope(|s| {
            let hs: Vec<_> = (0..2u32)
                .map(|half| {
                    let (table, barrier) = (&table, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        let start = Instant::now();
                        for t in (0..PER_THREAD as u32).map(|i| 2 * i + half) {
                            black_box(table.wake(t, half, |w| {
                                black_box(w);
                            }));
                        }
                        start.elapsed()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        total += times.into_iter().max().unwrap_or_default();
        drop(nodes);
    }
    total
}

fn wake_throughput(c: &mut Criterion) {
    let mut g = c.benchmark_group("wake_throughput");
    g.throughput(Throughput::Elements(2 * PER_THREAD as u64));
    g.bench_function("oskit-256-buckets-2-threads", |b| {
        b.iter_custom(wake_burst::<256>)
    });
    g.bench_function("oskit-1-bucket-2-threads", |b| {
        b.iter_custom(wake_burst::<1>)
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = fault_hook, wait_wake, wake_throughput
}
criterion_main!(benches);
