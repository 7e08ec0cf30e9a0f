//! Nested writers for real: a writing thread interrupted by two POSIX timer signals aimed at
//! it (an "irq" handler, and an "NMI" handler that also lands inside the irq one), all
//! writing CPU 0 of one buffer, with and without a consumer thread draining it. Checks the
//! accounting identity `accepted = read + overrun`, `dropped` = the writes refused as full or
//! busy, and `unread() == 0` after a drain, in both modes.
//!
//! Seconds long by default; `OSKIT_STRESS_SECS=N` runs each of the four configurations for N
//! seconds (`cargo xtask stress`).
#![cfg(target_os = "linux")]

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::HeapPages;
use oskit_ring_buffer::{Config, Error, LocalCpu, Mode, RingBuffer, sim::CountingClock};

type Rb = RingBuffer<HeapPages, CountingClock>;

/// Writers: 0 the thread, 1 the irq handler, 2 the NMI handler.
const SOURCES: usize = 3;

/// The buffer the signal handlers write (null: not armed).
static RB: AtomicPtr<Rb> = AtomicPtr::new(core::ptr::null_mut());
/// Per source: next sequence number, writes accepted, writes refused (full / busy).
static SEQ: [AtomicU64; SOURCES] = [const { AtomicU64::new(0) }; SOURCES];
static OK: [AtomicU64; SOURCES] = [const { AtomicU64::new(0) }; SOURCES];
static REFUSED: [AtomicU64; SOURCES] = [const { AtomicU64::new(0) }; SOURCES];

fn cpu0() -> LocalCpu {
    // SAFETY: only the writing thread and the signal handlers that interrupt it (which nest
    // on that thread) write CPU 0.
    unsafe { LocalCpu::new(0) }
}

/// Writes one event of source `src` (async-signal-safe: no allocation, no lock).
fn write_one(rb: &Rb, src: usize, len: usize) {
    let seq = SEQ[src].fetch_add(1, Ordering::Relaxed);
    let mut buf = [0u8; 256];
    buf[0] = src as u8;
    buf[4..12].copy_from_slice(&seq.to_le_bytes());
    match rb.write(cpu0(), &buf[..len.clamp(12, buf.len())]) {
        Ok(()) => OK[src].fetch_add(1, Ordering::Relaxed),
        Err(Error::Full | Error::Busy) => REFUSED[src].fetch_add(1, Ordering::Relaxed),
        Err(e) => panic!("unexpected {e:?}"),
    };
}

extern "C" fn on_signal(sig: libc::c_int) {
    let rb = RB.load(Ordering::Acquire);
    if rb.is_null() {
        return;
    }
    // SAFETY: the buffer outlives the armed period (the test disarms before dropping it).
    let rb = unsafe { &*rb };
    let src = if sig == libc::SIGALRM { 1 } else { 2 };
    let seq = SEQ[src].load(Ordering::Relaxed) as usize;
    write_one(rb, src, 12 + seq % 29);
}

/// A POSIX timer that sends `sig` to the calling thread every `period`.
struct ThreadTimer(libc::timer_t);

impl ThreadTimer {
    fn new(sig: libc::c_int, period: Duration) -> Self {
        // SAFETY: plain syscalls with valid, initialized arguments.
        unsafe {
            let mut sa: libc::sigaction = core::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(sig, &sa, core::ptr::null_mut()), 0);
            let mut ev: libc::sigevent = core::mem::zeroed();
            ev.sigev_notify = libc::SIGEV_THREAD_ID;
            ev.sigev_signo = sig;
            ev.sigev_notify_thread_id = libc::syscall(libc::SYS_gettid) as libc::c_int;
            let mut id: libc::timer_t = core::mem::zeroed();
            assert_eq!(
                libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut id),
                0
            );
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: period.as_nanos() as libc::c_long,
            };
            let spec = libc::itimerspec {
                it_interval: ts,
                it_value: ts,
            };
            assert_eq!(libc::timer_settime(id, 0, &spec, core::ptr::null_mut()), 0);
            Self(id)
        }
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: a timer created above.
        unsafe { libc::timer_delete(self.0) };
    }
}

/// Reads CPU 0: checks each source's sequence numbers increase and that the lost counts add
/// up; returns (events read, lost counts summed).
fn drain(rb: &Rb, last: &mut [Option<u64>; SOURCES], last_ts: &mut u64) -> (u64, u64) {
    let (mut read, mut lost) = (0, 0);
    let mut r = rb.reader(0).unwrap();
    while let Some(ev) = r.next_event() {
        // The order the README promises under nesting: events come out in buffer order with
        // time stamps that never decrease (a writer whose reservation an interrupt beat
        // reads the clock again, after the interrupting writer's reading).
        assert!(
            ev.ts >= *last_ts,
            "time went back: {} after {last_ts}",
            ev.ts
        );
        *last_ts = ev.ts;
        let src = ev.payload[0] as usize;
        let seq = u64::from_le_bytes(ev.payload[4..12].try_into().unwrap());
        assert!(src < SOURCES, "garbage event {:?}", ev.payload);
        if let Some(prev) = last[src] {
            assert!(seq > prev, "source {src}: {seq} after {prev}");
        }
        last[src] = Some(seq);
        read += 1;
        lost += ev.lost;
    }
    (read, lost)
}

fn run(mode: Mode, consumer: bool, secs: f64) {
    for c in SEQ.iter().chain(&OK).chain(&REFUSED) {
        c.store(0, Ordering::Relaxed);
    }
    let rb: Arc<Rb> = Arc::new(
        RingBuffer::new(
            Config::new(1, 4).mode(mode),
            HeapPages::default(),
            CountingClock::new(1),
        )
        .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut last = [None; SOURCES];
    let (mut read, mut lost, mut ts) = (0, 0, 0);
    let reader = consumer.then(|| {
        let (rb, stop) = (rb.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last = [None; SOURCES];
            let (mut read, mut lost, mut ts) = (0, 0, 0);
            while !stop.load(Ordering::Relaxed) {
                let (r, l) = drain(&rb, &mut last, &mut ts);
                read += r;
                lost += l;
            }
            (read, lost, last, ts)
        })
    });
    let writer = {
        let rb = rb.clone();
        std::thread::spawn(move || {
            RB.store(Arc::as_ptr(&rb).cast_mut(), Ordering::Release);
            let irq = ThreadTimer::new(libc::SIGALRM, Duration::from_micros(20));
            let nmi = ThreadTimer::new(libc::SIGRTMIN(), Duration::from_micros(53));
            let end = Instant::now() + Duration::from_secs_f64(secs);
            let mut n = 0usize;
            while Instant::now() < end {
                for _ in 0..64 {
                    write_one(&rb, 0, 12 + n % 181);
                    n += 1;
                }
            }
            drop((irq, nmi));
            RB.store(core::ptr::null_mut(), Ordering::Release);
        })
    };
    writer.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    if let Some(h) = reader {
        let (r, l, seen, t) = h.join().unwrap();
        read += r;
        lost += l;
        last = seen;
        ts = t;
    }
    let (r, l) = drain(&rb, &mut last, &mut ts);
    read += r;
    lost += l;

    let ok: u64 = OK.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    let refused: u64 = REFUSED.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    let nested: u64 = SEQ[1..].iter().map(|c| c.load(Ordering::Relaxed)).sum();
    let st = rb.stats(0).unwrap();
    let ctx = format!(
        "{mode:?}, consumer {consumer}: ok {ok}, nested writes {nested}, refused {refused}, read {read}, lost {lost}, {st:?}"
    );
    assert!(nested > 100, "the signals hardly fired: {ctx}");
    assert_eq!(st.entries, ok, "{ctx}");
    assert_eq!(st.dropped, refused, "{ctx}");
    assert_eq!(st.read, read, "{ctx}");
    assert_eq!(
        ok,
        read + st.overrun,
        "accepted events neither read nor overrun: {ctx}"
    );
    assert_eq!(lost, st.overrun, "lost counts handed out != overrun: {ctx}");
    assert_eq!(st.unread(), 0, "{ctx}");
    if mode == Mode::Overwrite {
        // A nested writer never meets a full ring of uncommitted data here (it writes one
        // small event), so nothing may be refused: one that meets a head push in progress
        // completes its write.
        assert_eq!(refused, 0, "{ctx}");
    }
}

#[test]
#[cfg_attr(
    miri,
    ignore = "POSIX timers and signal handlers are foreign functions Miri cannot run"
)]
fn nested_signal_writers_keep_exact_accounting() {
    let secs: f64 = std::env::var("OSKIT_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.75);
    for mode in [Mode::Overwrite, Mode::ProducerConsumer] {
        for consumer in [false, true] {
            run(mode, consumer, secs);
        }
    }
}
