//! Copy (fork) and zap (munmap) of 65,536 PTEs (256 MiB) mapping folios of 4 KiB, 16 KiB,
//! 64 KiB and 2 MiB: batched vs the per-PTE reference, in the same group.
//!
//! With feature `x86`, the same on the real x86-64 walker (`X86PageTables` over 4-level page
//! tables in ordinary memory), batched and per-PTE on the same tables in one group.
//!
//! Also prints, once, the page-table writes, write-protects and TLB operations per MiB for the
//! x86 model and the arm64 contiguous-bit model.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use oskit_pte_batch::hal::PAGE_SIZE;
use oskit_pte_batch::sim::{ContSpace, SimFolios, SimPage, SimSpace, TableStats};
use oskit_pte_batch::{Arm64Pte, Fork, PteFormat, Rss, X86Pte, Zap, reference};

mod support;

use support::{BASE, PFN, vma, world, x86_flags};

const N: usize = 65_536;
const SIZES: [(&str, u8); 4] = [("4K", 0), ("16K", 2), ("64K", 4), ("2M", 9)];

fn end() -> u64 {
    BASE + (N as u64) * PAGE_SIZE
}

/// Restores the initial state into buffers that stay allocated (and faulted in), so the
/// timed part never pays for page faults or allocation.
fn reset(p: &mut [u64], parent: &[u64], pg: &mut [SimPage], pages: &[SimPage], ch: &mut [u64]) {
    p.copy_from_slice(parent);
    pg.copy_from_slice(pages);
    ch.fill(0);
}

fn copy_batched(parent: &mut [u64], pages: &mut [SimPage], child: &mut [u64]) -> Rss {
    let mut f = SimFolios::from_pages(PFN, pages);
    let mut p = SimSpace::<X86Pte>::new(BASE, parent);
    let mut c = SimSpace::<X86Pte>::new(BASE, child);
    let v = vma(X86Pte::USER_READONLY);
    let mut fork = Fork::new(&mut f, v, v);
    fork.copy_range(&mut c, &mut p, BASE, end()).unwrap();
    fork.rss()
}

fn copy_reference(parent: &mut [u64], pages: &mut [SimPage], child: &mut [u64]) -> Rss {
    let mut f = SimFolios::from_pages(PFN, pages);
    let mut p = SimSpace::<X86Pte>::new(BASE, parent);
    let mut c = SimSpace::<X86Pte>::new(BASE, child);
    let v = vma(X86Pte::USER_READONLY);
    let mut rss = Rss::default();
    reference::copy_range(&mut c, &mut p, &mut f, v, v, BASE, end(), &mut rss).unwrap();
    rss
}

fn zap_batched(parent: &mut [u64], pages: &mut [SimPage]) -> Rss {
    let mut f = SimFolios::from_pages(PFN, pages);
    let mut p = SimSpace::<X86Pte>::new(BASE, parent);
    let mut zap = Zap::new(&mut f, vma(X86Pte::USER_READONLY));
    zap.zap_range(&mut p, BASE, end()).unwrap();
    zap.rss()
}

fn zap_reference(parent: &mut [u64], pages: &mut [SimPage]) -> Rss {
    let mut f = SimFolios::from_pages(PFN, pages);
    let mut p = SimSpace::<X86Pte>::new(BASE, parent);
    let mut rss = Rss::default();
    reference::zap_range(
        &mut p,
        &mut f,
        vma(X86Pte::USER_READONLY),
        BASE,
        end(),
        &mut rss,
    )
    .unwrap();
    rss
}

fn bench_copy(c: &mut Criterion) {
    let mut g = c.benchmark_group("copy_65536_ptes");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for (name, order) in SIZES {
        let (parent, pages) = world::<X86Pte>(N, order, x86_flags());
        for (label, f) in [
            (
                "oskit-batched",
                copy_batched as fn(&mut [u64], &mut [SimPage], &mut [u64]) -> Rss,
            ),
            ("per-pte-reference", copy_reference),
        ] {
            let (mut p, mut pg, mut ch) = (parent.clone(), pages.clone(), vec![0u64; N]);
            g.bench_with_input(BenchmarkId::new(label, name), &order, |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        reset(&mut p, &parent, &mut pg, &pages, &mut ch);
                        let t = Instant::now();
                        black_box(f(&mut p, &mut pg, &mut ch));
                        total += t.elapsed();
                    }
                    total
                })
            });
        }
    }
    g.finish();
}

fn bench_zap(c: &mut Criterion) {
    let mut g = c.benchmark_group("zap_65536_ptes");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for (name, order) in SIZES {
        let (parent, pages) = world::<X86Pte>(N, order, x86_flags());
        for (label, f) in [
            (
                "oskit-batched",
                zap_batched as fn(&mut [u64], &mut [SimPage]) -> Rss,
            ),
            ("per-pte-reference", zap_reference),
        ] {
            let (mut p, mut pg, mut ch) = (parent.clone(), pages.clone(), vec![0u64; N]);
            g.bench_with_input(BenchmarkId::new(label, name), &order, |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        reset(&mut p, &parent, &mut pg, &pages, &mut ch);
                        let t = Instant::now();
                        black_box(f(&mut p, &mut pg));
                        total += t.elapsed();
                    }
                    total
                })
            });
        }
    }
    g.finish();
}

/// Copy and zap on the real x86-64 walker: batched and per-PTE on the same tables.
#[cfg(all(feature = "x86", target_arch = "x86_64"))]
fn bench_x86_walker(c: &mut Criterion) {
    use support::real::Real;
    let mut g = c.benchmark_group("x86_walker_65536_ptes");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for (name, order) in [("4K", 0u8), ("64K", 4), ("2M", 9)] {
        let mut real = Real::new(N, order);
        for (op, copy) in [("copy", true), ("zap", false)] {
            for (label, batched) in [("oskit-batched", true), ("per-pte-reference", false)] {
                let id = BenchmarkId::new(label, format!("{op} {name}"));
                g.bench_with_input(id, &order, |b, _| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            real.reset();
                            let t = Instant::now();
                            if copy {
                                black_box(real.copy(batched));
                            } else {
                                black_box(real.zap(batched));
                            }
                            total += t.elapsed();
                        }
                        total
                    })
                });
            }
        }
    }
    g.finish();
}

#[cfg(not(all(feature = "x86", target_arch = "x86_64")))]
fn bench_x86_walker(_c: &mut Criterion) {}

/// Interleaved batched/per-PTE runs on the real walker, minimum of each.
#[cfg(all(feature = "x86", target_arch = "x86_64"))]
fn report_x86_min_times() {
    use support::real::Real;
    const REPS: usize = 41;
    eprintln!("\nreal x86-64 walker, minimum of {REPS} interleaved runs (ms):");
    eprintln!("folio | copy batched | copy per_pte | ratio | zap batched | zap per_pte | ratio");
    for (name, order) in [("4K", 0u8), ("64K", 4), ("2M", 9)] {
        if std::env::var("PTE_BATCH_ONLY").is_ok_and(|only| only != name) {
            continue;
        }
        let mut real = Real::new(N, order);
        let mut best = [f64::MAX; 4];
        for rep in 0..REPS {
            for j in 0..4 {
                let k = (j + rep) % 4;
                real.reset();
                let t = Instant::now();
                match k {
                    0 => black_box(real.copy(true)),
                    1 => black_box(real.copy(false)),
                    2 => black_box(real.zap(true)),
                    _ => black_box(real.zap(false)),
                };
                best[k] = best[k].min(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        eprintln!(
            "{name:>5} | {:>12.3} | {:>12.3} | {:>5.2} | {:>11.3} | {:>11.3} | {:>5.2}",
            best[0],
            best[1],
            best[1] / best[0],
            best[2],
            best[3],
            best[3] / best[2]
        );
    }
}

#[cfg(not(all(feature = "x86", target_arch = "x86_64")))]
fn report_x86_min_times() {}

/// Page-table and TLB operations per MiB of a fork of the arm64 contiguous-bit model, whose
/// parent was populated with `set_ptes` (so large folios are folded).
fn arm64_ops(order: u8, batched: bool) -> (TableStats, TableStats) {
    let flags = Arm64Pte::USER_READONLY | Arm64Pte::DBM;
    let (raw, mut pages) = world::<Arm64Pte>(N, order, flags & !Arm64Pte::RDONLY);
    let mut parent = vec![0u64; N];
    let mut child = vec![0u64; N];
    let mut p = ContSpace::new(BASE, &mut parent);
    let nr = 1usize << order;
    for k in (0..N).step_by(nr) {
        oskit_pte_batch::PageTable::set_ptes(&mut p, BASE + k as u64 * PAGE_SIZE, raw[k], nr);
    }
    p.reset_stats();
    let mut c = ContSpace::new(BASE, &mut child);
    let mut f = SimFolios::from_pages(PFN, &mut pages);
    let v = vma(Arm64Pte::USER_READONLY);
    if batched {
        let mut fork = Fork::new(&mut f, v, v);
        fork.copy_range(&mut c, &mut p, BASE, end()).unwrap();
    } else {
        let mut rss = Rss::default();
        reference::copy_range(&mut c, &mut p, &mut f, v, v, BASE, end(), &mut rss).unwrap();
    }
    (p.stats(), c.stats())
}

fn x86_ops(order: u8, batched: bool) -> TableStats {
    let (mut parent, mut pages) = world::<X86Pte>(N, order, x86_flags());
    let mut child = vec![0u64; N];
    let mut f = SimFolios::from_pages(PFN, &mut pages);
    let mut p = SimSpace::<X86Pte>::new(BASE, &mut parent);
    let mut c = SimSpace::<X86Pte>::new(BASE, &mut child);
    let v = vma(X86Pte::USER_READONLY);
    if batched {
        let mut fork = Fork::new(&mut f, v, v);
        fork.copy_range(&mut c, &mut p, BASE, end()).unwrap();
    } else {
        let mut rss = Rss::default();
        reference::copy_range(&mut c, &mut p, &mut f, v, v, BASE, end(), &mut rss).unwrap();
    }
    p.stats()
}

/// Interleaved batched/per-PTE runs, minimum of each: robust against a loaded machine.
fn report_min_times() {
    const REPS: usize = 41;
    eprintln!("\nminimum of {REPS} interleaved runs (ms):");
    eprintln!("folio | copy batched | copy per_pte | ratio | zap batched | zap per_pte | ratio");
    for (name, order) in SIZES {
        if std::env::var("PTE_BATCH_ONLY").is_ok_and(|only| only != name) {
            continue;
        }
        let (parent, pages) = world::<X86Pte>(N, order, x86_flags());
        let mut best = [f64::MAX; 4];
        let (mut p, mut pg, mut ch) = (parent.clone(), pages.clone(), vec![0u64; N]);
        for rep in 0..REPS {
            for j in 0..4 {
                // Rotate the order so no variant always runs first.
                let k = (j + rep) % 4;
                let slot = &mut best[k];
                reset(&mut p, &parent, &mut pg, &pages, &mut ch);
                let t = Instant::now();
                match k {
                    0 => black_box(copy_batched(&mut p, &mut pg, &mut ch)),
                    1 => black_box(copy_reference(&mut p, &mut pg, &mut ch)),
                    2 => black_box(zap_batched(&mut p, &mut pg)),
                    _ => black_box(zap_reference(&mut p, &mut pg)),
                };
                *slot = slot.min(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        eprintln!(
            "{name:>5} | {:>12.3} | {:>12.3} | {:>5.2} | {:>11.3} | {:>11.3} | {:>5.2}",
            best[0],
            best[1],
            best[1] / best[0],
            best[2],
            best[3],
            best[3] / best[2]
        );
    }
}

fn report_ops(_c: &mut Criterion) {
    if std::env::args().any(|a| a == "--bench") {
        report_min_times();
        report_x86_min_times();
    }
    let mib = (N as u64 * PAGE_SIZE) >> 20;
    eprintln!("\nfork operations per MiB (256 MiB copied, COW, all writable):");
    eprintln!(
        "folio | impl    | x86 parent writes | x86 TLB flushes | arm64 parent unfolds | arm64 parent TLBI | arm64 child folds"
    );
    for (name, order) in SIZES {
        for batched in [true, false] {
            let x = x86_ops(order, batched);
            let (ap, ac) = arm64_ops(order, batched);
            eprintln!(
                "{name:>5} | {:7} | {:>17.1} | {:>15.3} | {:>20.2} | {:>17.2} | {:>17.2}",
                if batched { "batched" } else { "per_pte" },
                x.writes as f64 / mib as f64,
                x.tlb_flushes as f64 / mib as f64,
                ap.unfolds as f64 / mib as f64,
                ap.tlb_flushes as f64 / mib as f64,
                ac.folds as f64 / mib as f64,
            );
        }
    }
}

criterion_group!(benches, report_ops, bench_copy, bench_zap, bench_x86_walker);
criterion_main!(benches);
