//! Instruction-count probes of the hot paths, for `cargo xtask budgets` (callgrind counts the
//! instructions inside each `icount_*` function): `icount PROBE ITERS`.
//!
//! - `reserve_commit_16`: reserve, fill and commit a 16-byte event (overwrite mode, so the ring
//!   keeps turning; sub-buffer changes are included, amortised).
//! - `write_8`, `write_64`: `write()` of an 8- or 64-byte event (overwrite mode, as the
//!   `write` benchmark group does).
//! - `read_event`: consume one event with the in-kernel reader (reader-page swaps included,
//!   amortised).

use std::hint::black_box;

use oskit_ring_buffer::{
    Config, LocalCpu, Mode, RingBuffer,
    sim::{CountingClock, PagePool},
};

static PAGES: PagePool<128> = PagePool::new();

type Buffer<'a> = RingBuffer<&'static PagePool<128>, &'a CountingClock>;

/// Writes `iters` 16-byte events through reserve/commit.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn icount_reserve_commit_16(rb: &Buffer<'_>, iters: u64) {
    // SAFETY: this single-threaded program is CPU 0's only writer.
    let cpu = unsafe { LocalCpu::new(0) };
    let data = [0x5au8; 16];
    for _ in 0..iters {
        if let Ok(mut r) = rb.reserve(cpu, 16) {
            r.payload_mut().copy_from_slice(black_box(&data));
            r.commit();
        }
    }
}

/// Writes `iters` events of `N` bytes with `write()`.
fn write_n<const N: usize>(rb: &Buffer<'_>, iters: u64) {
    // SAFETY: this single-threaded program is CPU 0's only writer.
    let cpu = unsafe { LocalCpu::new(0) };
    let data = [0x5au8; N];
    for _ in 0..iters {
        let _ = black_box(rb.write(cpu, black_box(&data)));
    }
}

/// Writes `iters` 8-byte events.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn icount_write_8(rb: &Buffer<'_>, iters: u64) {
    write_n::<8>(rb, iters)
}

/// Writes `iters` 64-byte events.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn icount_write_64(rb: &Buffer<'_>, iters: u64) {
    write_n::<64>(rb, iters)
}

/// Consumes `iters` events.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn icount_read_event(rb: &Buffer<'_>, iters: u64) {
    let mut reader = rb.reader(0).expect("CPU 0 exists");
    for _ in 0..iters {
        black_box(reader.next_event().map(|e| e.payload.len()));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (probe, iters) = match args.as_slice() {
        [_, probe, iters] => (
            probe.as_str(),
            iters.parse::<u64>().expect("ITERS is a number"),
        ),
        _ => panic!("usage: icount PROBE ITERS"),
    };
    let clock = CountingClock::new(1_000);
    match probe {
        "reserve_commit_16" => {
            let config = Config::new(1, 8).mode(Mode::Overwrite);
            let rb = RingBuffer::new(config, &PAGES, &clock).expect("buffer");
            icount_reserve_commit_16(&rb, iters);
        }
        "write_8" | "write_64" => {
            let config = Config::new(1, 8).mode(Mode::Overwrite);
            let rb = RingBuffer::new(config, &PAGES, &clock).expect("buffer");
            if probe == "write_8" {
                icount_write_8(&rb, iters);
            } else {
                icount_write_64(&rb, iters);
            }
        }
        "read_event" => {
            let config = Config::new(1, 32).mode(Mode::ProducerConsumer);
            let rb = RingBuffer::new(config, &PAGES, &clock).expect("buffer");
            // SAFETY: this single-threaded program is CPU 0's only writer.
            let cpu = unsafe { LocalCpu::new(0) };
            let written = (0..iters + 64)
                .filter(|_| rb.write(cpu, &[0xa5; 16]).is_ok())
                .count();
            assert!(
                written as u64 >= iters,
                "only {written} events fit for {iters} reads"
            );
            icount_read_event(&rb, iters);
        }
        other => panic!("unknown probe {other}"),
    }
}
