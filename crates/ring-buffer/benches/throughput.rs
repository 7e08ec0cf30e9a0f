//! Write and read throughput against rtrb, ringbuf, crossbeam's ArrayQueue (fed the same
//! length-prefixed records) and a plain memcpy into a preallocated buffer (the ceiling).
//!
//! `cargo bench -p oskit-ring-buffer` (or `cargo xtask bench ring-buffer`).

use std::{
    alloc::{Layout, alloc_zeroed, dealloc},
    cell::Cell,
    hint::black_box,
    ptr::NonNull,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use crossbeam_queue::ArrayQueue;
use oskit_ring_buffer::{
    Clock, Config, Error, LocalCpu, Mode, PageAlloc, RingBuffer, format::PAGE_SIZE,
};
use ringbuf::traits::{Consumer as _, Observer as _, Producer as _, Split as _};

struct Heap;

// SAFETY: page-aligned zeroed memory from the global allocator, freed with the same layout.
unsafe impl PageAlloc for Heap {
    fn alloc_pages(&self, order: u32) -> Option<NonNull<u8>> {
        let layout = Layout::from_size_align(PAGE_SIZE << order, PAGE_SIZE).ok()?;
        // SAFETY: non-zero size.
        NonNull::new(unsafe { alloc_zeroed(layout) })
    }
    unsafe fn free_pages(&self, pages: NonNull<u8>, order: u32) {
        let layout = Layout::from_size_align(PAGE_SIZE << order, PAGE_SIZE).unwrap();
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(pages.as_ptr(), layout) }
    }
}

/// A cheap clock: a counter in a `Cell` (the benchmark is single-threaded).
struct CheapClock(Cell<u64>);
impl Clock for CheapClock {
    fn now(&self) -> u64 {
        let t = self.0.get() + 3;
        self.0.set(t);
        t
    }
}

const SIZES: [usize; 4] = [8, 64, 256, 1024];
/// Bytes of every ring (about 256 KiB), so all fit in L2.
const RING_BYTES: usize = 256 << 10;

fn cpu0() -> LocalCpu {
    // SAFETY: the benchmark thread is the only writer of CPU 0.
    unsafe { LocalCpu::new(0) }
}

fn oskit(mode: Mode) -> RingBuffer<Heap, CheapClock> {
    RingBuffer::new(
        Config::new(1, RING_BYTES / PAGE_SIZE).mode(mode),
        Heap,
        CheapClock(Cell::new(0)),
    )
    .unwrap()
}

/// Times `iters` writes; `write` returns false when the ring is full, then `drain` runs
/// off the clock.
fn timed(iters: u64, mut write: impl FnMut() -> bool, mut drain: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let start = Instant::now();
        while done < iters && write() {
            done += 1;
        }
        total += start.elapsed();
        if done < iters {
            drain();
        }
    }
    total
}

/// Copies `src` to offset `at` of the concatenation `a ++ b` (a ring's two free slices).
fn split_copy(a: &mut [u8], b: &mut [u8], at: usize, src: &[u8]) {
    if at >= a.len() {
        b[at - a.len()..at - a.len() + src.len()].copy_from_slice(src);
    } else if at + src.len() <= a.len() {
        a[at..at + src.len()].copy_from_slice(src);
    } else {
        let n = a.len() - at;
        a[at..].copy_from_slice(&src[..n]);
        b[..src.len() - n].copy_from_slice(&src[n..]);
    }
}

#[derive(Clone, Copy)]
struct Rec<const N: usize> {
    len: u32,
    data: [u8; N],
}

fn write_group(c: &mut Criterion) {
    let mut g = c.benchmark_group("write");
    g.measurement_time(Duration::from_millis(1500));
    g.warm_up_time(Duration::from_millis(300));
    g.sample_size(20);
    for size in SIZES {
        let payload = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));

        let rb = oskit(Mode::Overwrite);
        g.bench_with_input(BenchmarkId::new("oskit-overwrite", size), &size, |b, _| {
            b.iter_custom(|n| timed(n, || rb.write(cpu0(), black_box(&payload)).is_ok(), || {}))
        });

        let rb = oskit(Mode::ProducerConsumer);
        g.bench_with_input(
            BenchmarkId::new("oskit-producer-consumer", size),
            &size,
            |b, _| {
                b.iter_custom(|n| {
                    timed(
                        n,
                        || match rb.write(cpu0(), black_box(&payload)) {
                            Ok(()) => true,
                            Err(Error::Full) => false,
                            Err(e) => panic!("{e}"),
                        },
                        || rb.reset(cpu0()).unwrap(),
                    )
                })
            },
        );

        let (mut p, mut cons) = rtrb::RingBuffer::<u8>::new(RING_BYTES);
        g.bench_with_input(BenchmarkId::new("rtrb", size), &size, |b, _| {
            b.iter_custom(|n| {
                timed(
                    n,
                    || {
                        let Ok(mut chunk) = p.write_chunk(4 + size) else {
                            return false;
                        };
                        let (a, bb) = chunk.as_mut_slices();
                        split_copy(a, bb, 0, &(size as u32).to_le_bytes());
                        split_copy(a, bb, 4, black_box(&payload));
                        chunk.commit_all();
                        true
                    },
                    || {
                        let n = cons.slots();
                        cons.read_chunk(n).unwrap().commit_all();
                    },
                )
            })
        });

        let (mut p, mut cons) = ringbuf::HeapRb::<u8>::new(RING_BYTES).split();
        g.bench_with_input(BenchmarkId::new("ringbuf", size), &size, |b, _| {
            b.iter_custom(|n| {
                timed(
                    n,
                    || {
                        if p.vacant_len() < 4 + size {
                            return false;
                        }
                        p.push_slice(&(size as u32).to_le_bytes());
                        p.push_slice(black_box(&payload));
                        true
                    },
                    || {
                        let n = cons.occupied_len();
                        cons.skip(n);
                    },
                )
            })
        });

        macro_rules! array_queue {
            ($n:literal) => {{
                let q = ArrayQueue::<Rec<$n>>::new(RING_BYTES / ($n + 4));
                g.bench_with_input(
                    BenchmarkId::new("crossbeam-ArrayQueue", size),
                    &size,
                    |b, _| {
                        b.iter_custom(|n| {
                            timed(
                                n,
                                || {
                                    let mut rec = Rec {
                                        len: size as u32,
                                        data: [0; $n],
                                    };
                                    rec.data.copy_from_slice(black_box(&payload));
                                    q.push(rec).is_ok()
                                },
                                || {
                                    while let Some(r) = q.pop() {
                                        black_box(r.len);
                                    }
                                },
                            )
                        })
                    },
                );
            }};
        }
        match size {
            8 => array_queue!(8),
            64 => array_queue!(64),
            256 => array_queue!(256),
            _ => array_queue!(1024),
        }

        let mut buf = vec![0u8; RING_BYTES];
        let at = Cell::new(0usize);
        g.bench_with_input(BenchmarkId::new("memcpy", size), &size, |b, _| {
            b.iter_custom(|n| {
                timed(
                    n,
                    || {
                        let i = at.get();
                        if i + 4 + size > buf.len() {
                            return false;
                        }
                        buf[i..i + 4].copy_from_slice(&(size as u32).to_le_bytes());
                        buf[i + 4..i + 4 + size].copy_from_slice(black_box(&payload));
                        at.set(i + 4 + size);
                        true
                    },
                    || at.set(0),
                )
            })
        });
    }
    g.finish();
}

fn read_group(c: &mut Criterion) {
    let mut g = c.benchmark_group("read");
    g.measurement_time(Duration::from_millis(1500));
    g.warm_up_time(Duration::from_millis(300));
    g.sample_size(20);
    for size in [8usize, 256] {
        let payload = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        let rb = oskit(Mode::Overwrite);
        g.bench_with_input(BenchmarkId::new("oskit-consume", size), &size, |b, _| {
            b.iter_custom(|n| {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < n {
                    // Fill (untimed) less than the ring, then time consuming it.
                    let batch = ((RING_BYTES / 2) / (size + 8)).min((n - done) as usize);
                    for _ in 0..batch {
                        rb.write(cpu0(), &payload).unwrap();
                    }
                    let start = Instant::now();
                    let mut r = rb.reader(0).unwrap();
                    while let Some(e) = r.next_event() {
                        black_box(e.payload);
                        done += 1;
                    }
                    total += start.elapsed();
                }
                total
            })
        });
        // Whole sub-buffers handed over (`read_page`, zero copy when complete), per event.
        let mut page = rb.alloc_read_page().unwrap();
        g.bench_with_input(BenchmarkId::new("oskit-read-page", size), &size, |b, _| {
            b.iter_custom(|n| {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < n {
                    let batch = ((RING_BYTES / 2) / (size + 8)).min((n - done) as usize);
                    for _ in 0..batch {
                        rb.write(cpu0(), &payload).unwrap();
                    }
                    let start = Instant::now();
                    while let Some(got) = rb.read_page(0, &mut page, false).unwrap() {
                        black_box(page.as_bytes()[16]);
                        done += got.events;
                    }
                    total += start.elapsed();
                }
                total
            })
        });
        rb.free_read_page(page);
    }
    g.finish();
}

criterion_group!(benches, write_group, read_group);
criterion_main!(benches);
