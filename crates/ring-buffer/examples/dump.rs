//! Writes a reproducible event stream into a one-CPU ring buffer, then consumes it through the
//! mapping (`map_get_reader`) as a user-space reader would: every consumed reader sub-buffer
//! is appended, whole, to FILE (like `cat per_cpu/cpu0/trace_pipe_raw > FILE` on Linux), and
//! every event is printed as `cpu=0 ts=.. len=.. data=..` (with `lost=N` lines).
//!
//! `dump --out FILE [--seed S] [--overwrite] [--subbuf-size N]`

use std::{
    alloc::{Layout, alloc_zeroed, dealloc},
    io::Write,
    process::ExitCode,
    ptr::NonNull,
};

use oskit_ring_buffer::{
    Config, LocalCpu, MappedReader, Mode, PageAlloc, RingBuffer,
    format::{EventLine, PAGE_SIZE},
    sim::ManualClock,
};

struct Heap;

// SAFETY: page-aligned zeroed memory from the global allocator, freed with the same layout.
unsafe impl PageAlloc for Heap {
    fn alloc_pages(&self, order: u32) -> Option<NonNull<u8>> {
        let layout = Layout::from_size_align(PAGE_SIZE << order, PAGE_SIZE).ok()?;
        // SAFETY: non-zero size.
        NonNull::new(unsafe { alloc_zeroed(layout) })
    }

    unsafe fn free_pages(&self, pages: NonNull<u8>, order: u32) {
        if let Ok(layout) = Layout::from_size_align(PAGE_SIZE << order, PAGE_SIZE) {
            // SAFETY: allocated by `alloc_pages` with this layout.
            unsafe { dealloc(pages.as_ptr(), layout) }
        }
    }
}

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

const SUBBUFS: usize = 8;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut out, mut seed, mut overwrite, mut subbuf_size) = (None, 1u64, false, 4096usize);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = args.next(),
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).unwrap_or(1),
            "--overwrite" => overwrite = true,
            "--subbuf-size" => subbuf_size = args.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            _ => {}
        }
    }
    let Some(out) = out else {
        eprintln!("usage: dump --out FILE [--seed S] [--overwrite] [--subbuf-size N]");
        return ExitCode::from(2);
    };
    if !subbuf_size.is_power_of_two() || subbuf_size < PAGE_SIZE {
        eprintln!("dump: --subbuf-size must be a power of two >= 4096");
        return ExitCode::from(2);
    }
    let order = (subbuf_size / PAGE_SIZE).trailing_zeros();
    let mode = if overwrite {
        Mode::Overwrite
    } else {
        Mode::ProducerConsumer
    };
    let clock = ManualClock::new(1_000_000);
    let rb = match RingBuffer::new(
        Config::new(1, SUBBUFS).subbuf_order(order).mode(mode),
        Heap,
        &clock,
    ) {
        Ok(rb) => rb,
        Err(e) => {
            eprintln!("dump: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SAFETY: this thread is the only writer of CPU 0.
    let cpu = unsafe { LocalCpu::new(0) };

    // A stream three times the buffer: it wraps, so events are overwritten or dropped.
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let max = rb.max_payload();
    let mut written = 0usize;
    let mut n = 0u64;
    while written < 3 * SUBBUFS * subbuf_size {
        let len = match rng.next() % 8 {
            0 => 0,
            1 => max,
            2 | 3 => (rng.next() % 16) as usize,
            _ => (rng.next() % (max as u64 + 1)) as usize / 8,
        };
        let gap = match rng.next() % 16 {
            0 => (1 << 27) + rng.next() % (1 << 30), // needs a time extend
            _ => 1 + rng.next() % 5000,
        };
        clock.advance(gap);
        let data: Vec<u8> = (0..len).map(|i| (n as u8) ^ (i as u8)).collect();
        n += 1;
        if rb.write(cpu, &data).is_ok() {
            written += len + 8;
        } else {
            written += 8; // dropped in producer/consumer mode
        }
    }

    let mut file = match std::fs::File::create(&out) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("dump: {out}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = rb.map(0) {
        eprintln!("dump: map: {e}");
        return ExitCode::FAILURE;
    }
    let view = rb.mapped_view(0).expect("mapped");
    let mut reader = match MappedReader::new(view, || rb.map_get_reader(0)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dump: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut page = vec![0u8; subbuf_size];
    let mut buf = vec![0u8; subbuf_size];
    let stdout = std::io::stdout();
    let mut stdout = stdout.lock();
    loop {
        match reader.get_reader() {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                eprintln!("dump: get_reader: {e}");
                return ExitCode::FAILURE;
            }
        }
        let copied = reader
            .copy_subbuf(&mut page)
            .map_err(|e| e.to_string())
            .and_then(|n| file.write_all(&page[..n]).map_err(|e| e.to_string()));
        if let Err(e) = copied {
            eprintln!("dump: {out}: {e}");
            return ExitCode::FAILURE;
        }
        loop {
            match reader.next_in_subbuf(&mut buf) {
                Ok(Some(ev)) => {
                    if ev.lost > 0 {
                        let _ = writeln!(stdout, "lost={}", ev.lost);
                    }
                    let line = EventLine {
                        cpu: 0,
                        ts: ev.ts,
                        payload: &buf[..ev.len],
                    };
                    let _ = writeln!(stdout, "{line}");
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!("dump: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }

    let _ = rb.unmap(0);
    ExitCode::SUCCESS
}
