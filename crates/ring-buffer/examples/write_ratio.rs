//! Noise-tolerant check of the small-event goal: `write()` time as a multiple of rtrb's for the
//! same length-prefixed record, with the two writers interleaved in short rounds and the best
//! round of each kept (a round that another process preempted only loses). Complements the
//! criterion group `write` (`benches/throughput.rs`), whose medians move by up to 2x on a shared
//! machine.
//!
//! `cargo run --release -p oskit-ring-buffer --example write_ratio [-- SIZE...]` (8 64 1024 by
//! default); pin it for steadier numbers: `taskset -c 1 target/release/examples/write_ratio`.

use std::{cell::Cell, hint::black_box, time::Instant};

use oskit_ring_buffer::{Clock, Config, LocalCpu, Mode, RingBuffer, sim::PagePool};

/// The benchmark's cheap clock: a counter that advances 3 per read.
struct CheapClock(Cell<u64>);

impl Clock for CheapClock {
    fn now(&self) -> u64 {
        let t = self.0.get() + 3;
        self.0.set(t);
        t
    }
}

/// 256 KiB rings, as in the criterion group.
static PAGES: PagePool<80> = PagePool::new();
const RING_BYTES: usize = 256 << 10;
const ROUNDS: usize = 300;

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

fn main() {
    let mut sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("SIZE is a number of bytes"))
        .collect();
    if sizes.is_empty() {
        sizes = vec![8, 64, 1024];
    }
    // SAFETY: this single-threaded program is CPU 0's only writer.
    let cpu = unsafe { LocalCpu::new(0) };
    for size in sizes {
        let payload = vec![0x5au8; size];
        let rb = RingBuffer::new(
            Config::new(1, RING_BYTES / 4096).mode(Mode::Overwrite),
            &PAGES,
            CheapClock(Cell::new(0)),
        )
        .expect("buffer");
        let (mut producer, mut consumer) = rtrb::RingBuffer::<u8>::new(RING_BYTES);
        // Records per round: well inside rtrb's ring, which is drained between rounds.
        let n = 2000.min((RING_BYTES * 3 / 4) / (size + 8));
        let (mut best_oskit, mut best_rtrb) = (f64::MAX, f64::MAX);
        for _ in 0..ROUNDS {
            let start = Instant::now();
            for _ in 0..n {
                rb.write(cpu, black_box(&payload))
                    .expect("overwrite mode never fails");
            }
            best_oskit = best_oskit.min(start.elapsed().as_nanos() as f64 / n as f64);
            let start = Instant::now();
            for _ in 0..n {
                let mut chunk = producer.write_chunk(4 + size).expect("room");
                let (a, b) = chunk.as_mut_slices();
                split_copy(a, b, 0, &(size as u32).to_le_bytes());
                split_copy(a, b, 4, black_box(&payload));
                chunk.commit_all();
            }
            best_rtrb = best_rtrb.min(start.elapsed().as_nanos() as f64 / n as f64);
            let used = consumer.slots();
            consumer.read_chunk(used).expect("filled").commit_all();
        }
        println!(
            "{size:>5} B: oskit {best_oskit:6.2} ns, rtrb {best_rtrb:6.2} ns, oskit/rtrb {:.2}",
            best_oskit / best_rtrb
        );
    }
}
