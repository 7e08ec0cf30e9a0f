//! Loom models of the lockless protocols. Run:
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p oskit-ring-buffer --release --test loom`
#![cfg(loom)]

mod common;

use common::HeapPages;
use loom::{sync::Arc, thread};
use oskit_ring_buffer::{
    Config, DataPage, LocalCpu, MappedReader, Mode, RingBuffer, RunOn, sim::CountingClock,
};

type Rb = RingBuffer<HeapPages, CountingClock>;

fn buffer(mode: Mode) -> Arc<Rb> {
    Arc::new(
        RingBuffer::new(
            Config::new(1, 2).mode(mode),
            HeapPages::default(),
            CountingClock::new(1),
        )
        .unwrap(),
    )
}

fn cpu0() -> LocalCpu {
    // SAFETY: in each model only one thread writes CPU 0 (the "interrupt" runs inline in it).
    unsafe { LocalCpu::new(0) }
}

/// Event `i`: its first byte is `i`, its length makes one or two events fill a sub-buffer.
fn event(i: u8, len: usize) -> Vec<u8> {
    let mut v = vec![0xee; len];
    v[0] = i;
    v
}

/// Drains the reader; returns the first bytes and the lost counts.
fn drain(rb: &Rb, out: &mut Vec<(u8, u64)>) {
    let mut r = rb.reader(0).unwrap();
    while let Some(e) = r.next_event() {
        out.push((e.payload[0], e.lost));
    }
}

fn check_sequence(seen: &[(u8, u64)], written: u8, overwrite: bool) {
    let mut expect = 0u8;
    for &(i, lost) in seen {
        assert!(i >= expect, "reordered or duplicated: {seen:?}");
        if overwrite {
            assert_eq!(
                u64::from(i - expect),
                lost,
                "lost count != skipped: {seen:?}"
            );
        } else {
            assert_eq!(lost, 0);
        }
        expect = i + 1;
    }
    assert!(expect <= written);
}

#[test]
fn writer_vs_reader_swap() {
    loom::model(|| {
        let rb = buffer(Mode::ProducerConsumer);
        let w = {
            let rb = rb.clone();
            thread::spawn(move || {
                let mut ok = Vec::new();
                for i in 0..3u8 {
                    ok.push(rb.write(cpu0(), &event(i, 2000)).is_ok());
                }
                ok
            })
        };
        let mut seen = Vec::new();
        drain(&rb, &mut seen);
        let ok = w.join().unwrap();
        drain(&rb, &mut seen);
        // Producer/consumer: exactly the accepted events, in order, none lost.
        let accepted: Vec<u8> = (0..3).filter(|i| ok[*i as usize]).collect();
        let got: Vec<u8> = seen.iter().map(|s| s.0).collect();
        assert_eq!(got, accepted);
        check_sequence(&seen, 3, false);
        let st = rb.stats(0).unwrap();
        assert_eq!(st.entries, accepted.len() as u64);
        assert_eq!(st.unread(), 0);
    });
}

#[test]
fn overwrite_head_push_vs_reader_swap() {
    loom::model(|| {
        let rb = buffer(Mode::Overwrite);
        let w = {
            let rb = rb.clone();
            thread::spawn(move || {
                for i in 0..4u8 {
                    rb.write(cpu0(), &event(i, 4000)).unwrap(); // one per sub-buffer
                }
            })
        };
        let mut seen = Vec::new();
        drain(&rb, &mut seen);
        w.join().unwrap();
        drain(&rb, &mut seen);
        check_sequence(&seen, 4, true);
        assert_eq!(
            seen.last().map(|s| s.0),
            Some(3),
            "the newest event survives: {seen:?}"
        );
        let st = rb.stats(0).unwrap();
        assert_eq!(st.entries, 4);
        assert_eq!(st.unread(), 0);
        assert_eq!(st.read + st.overrun, 4);
    });
}

#[test]
fn nested_writer_interrupting_a_reservation() {
    loom::model(|| {
        let rb = buffer(Mode::Overwrite);
        let w = {
            let rb = rb.clone();
            thread::spawn(move || {
                let mut outer = rb.reserve(cpu0(), 1500).unwrap();
                outer.payload_mut()[0] = 0;
                // An interrupt on the same CPU: it writes two events (moving to the next
                // sub-buffer) while the outer one is reserved.
                rb.write(cpu0(), &event(1, 1500)).unwrap();
                rb.write(cpu0(), &event(2, 1500)).unwrap();
                outer.commit();
            })
        };
        let mut seen = Vec::new();
        drain(&rb, &mut seen);
        // Nothing is published before the outermost commit, so 1 and 2 never show without 0.
        assert!(seen.is_empty() || seen[0].0 == 0, "{seen:?}");
        w.join().unwrap();
        drain(&rb, &mut seen);
        let got: Vec<u8> = seen.iter().map(|s| s.0).collect();
        assert_eq!(got, [0, 1, 2]);
    });
}

#[test]
fn map_get_reader_racing_a_writer() {
    loom::model(|| {
        let rb = buffer(Mode::Overwrite);
        rb.map(0).unwrap();
        let w = {
            let rb = rb.clone();
            thread::spawn(move || {
                for i in 0..3u8 {
                    rb.write(cpu0(), &event(i, 3000)).unwrap();
                }
            })
        };
        let view = rb.mapped_view(0).unwrap();
        let mut reader = MappedReader::new(&view, || rb.map_get_reader(0)).unwrap();
        let mut buf = vec![0u8; 4096];
        let mut seen = Vec::new();
        if let Some(ev) = reader.next_event(&mut buf).unwrap() {
            seen.push((buf[0], ev.lost));
        }
        w.join().unwrap();
        while let Some(ev) = reader.next_event(&mut buf).unwrap() {
            seen.push((buf[0], ev.lost));
        }
        check_sequence(&seen, 3, true);
        assert_eq!(seen.last().map(|s| s.0), Some(2), "{seen:?}");
        let meta = reader.meta();
        assert_eq!(meta.entries, 3);
        assert_eq!(meta.entries - meta.overrun - meta.read, 0);
    });
}

/// Reads one page (exchanged or copied) and records its events' first bytes and lost counts.
fn read_page(rb: &Rb, page: &mut DataPage, out: &mut Vec<(u8, u64)>) -> bool {
    let Some(got) = rb.read_page(0, page, false).unwrap() else {
        return false;
    };
    let mut sb = page.subbuf().unwrap();
    let mut first = true;
    while let Some(ev) = sb.next_event().unwrap() {
        out.push((ev.payload[0], if first { got.lost } else { 0 }));
        first = false;
    }
    assert_eq!(
        page.subbuf()
            .unwrap()
            .missed_events(page.as_bytes())
            .is_some(),
        got.lost > 0
    );
    true
}

#[test]
fn read_page_racing_a_writer() {
    loom::model(|| {
        let rb = buffer(Mode::Overwrite);
        let w = {
            let rb = rb.clone();
            thread::spawn(move || {
                for i in 0..3u8 {
                    rb.write(cpu0(), &event(i, 3000)).unwrap(); // one per sub-buffer
                }
            })
        };
        let mut page = rb.alloc_read_page().unwrap();
        let mut seen = Vec::new();
        // Racing the writer: the page is exchanged if the writer has left it, else copied.
        read_page(&rb, &mut page, &mut seen);
        w.join().unwrap();
        while read_page(&rb, &mut page, &mut seen) {}
        check_sequence(&seen, 3, true);
        assert_eq!(seen.last().map(|s| s.0), Some(2), "{seen:?}");
        let st = rb.stats(0).unwrap();
        assert_eq!(st.entries, 3);
        assert_eq!(st.unread(), 0);
        assert_eq!(st.read + st.overrun, 3);
        rb.free_read_page(page);
    });
}

/// CPU 0's cross-CPU call: the poster leaves the function in the slot and waits; CPU 0's thread
/// runs it when it polls (between writes, or inside a reservation, as an IPI would).
struct Mailbox {
    slot: loom::sync::Mutex<Option<SendPtr>>,
    done: loom::sync::atomic::AtomicBool,
}

struct SendPtr(*mut (dyn FnMut() + 'static));
// SAFETY: only used while the poster waits for it (see `run_on`).
unsafe impl Send for SendPtr {}

impl Mailbox {
    fn serve(&self) {
        if let Some(p) = self.slot.lock().unwrap().take() {
            // SAFETY: the poster waits in `run_on` until `done`, so the closure is alive.
            unsafe { (*p.0)() };
            self.done.store(true, loom::sync::atomic::Ordering::Release);
        }
    }
}

// SAFETY: `serve` runs the function on CPU 0's thread, between its writes or inside a
// reservation committed after it returns; `run_on` waits for it.
unsafe impl RunOn for Mailbox {
    fn run_on(&self, _cpu: usize, f: &mut dyn FnMut()) {
        let p: *mut (dyn FnMut() + '_) = f;
        // SAFETY: only the lifetime is erased; we wait below until the call is over.
        let p: *mut (dyn FnMut() + 'static) = unsafe { std::mem::transmute(p) };
        self.done
            .store(false, loom::sync::atomic::Ordering::Relaxed);
        *self.slot.lock().unwrap() = Some(SendPtr(p));
        while !self.done.load(loom::sync::atomic::Ordering::Acquire) {
            thread::yield_now();
        }
    }
}

#[test]
fn reset_from_another_cpu_through_a_cross_cpu_call() {
    loom::model(|| {
        let rb = buffer(Mode::Overwrite);
        let mailbox = Arc::new(Mailbox {
            slot: loom::sync::Mutex::new(None),
            done: loom::sync::atomic::AtomicBool::new(false),
        });
        let reset_done = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        let w = {
            let (rb, mailbox, reset_done) = (rb.clone(), mailbox.clone(), reset_done.clone());
            thread::spawn(move || {
                rb.write(cpu0(), &event(0, 1500)).unwrap();
                mailbox.serve();
                let mut r = rb.reserve(cpu0(), 1500).unwrap();
                r.payload_mut()[0] = 1;
                mailbox.serve(); // lands inside a writer: the reset is tried again
                r.commit();
                rb.write(cpu0(), &event(2, 1500)).unwrap();
                while !reset_done.load(loom::sync::atomic::Ordering::Acquire) {
                    mailbox.serve();
                    thread::yield_now();
                }
            })
        };
        rb.reset_cpu(0, &*mailbox).unwrap();
        reset_done.store(true, loom::sync::atomic::Ordering::Release);
        w.join().unwrap();
        // What is left is what was written after the reset: a suffix of 0, 1, 2.
        let mut seen = Vec::new();
        drain(&rb, &mut seen);
        let got: Vec<u8> = seen.iter().map(|s| s.0).collect();
        assert!(
            [&[0u8, 1, 2][..], &[1, 2], &[2], &[]].contains(&&got[..]),
            "{seen:?}"
        );
        assert!(seen.iter().all(|s| s.1 == 0), "{seen:?}");
        let st = rb.stats(0).unwrap();
        assert_eq!(st.entries, got.len() as u64);
        assert_eq!((st.unread(), st.overrun), (0, 0));
    });
}

// ---------------------------------------------------------------------------------------------
// Simulated interrupts: a nested writer of the same CPU at every interrupt point of the write
// path (enter, the fast and the slow reservation, the head push, the discard, publish, leave),
// one model per point, until a run passes no more points.

use oskit_ring_buffer::{Clock, interrupts};
use std::{
    cell::Cell,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

std::thread_local! {
    /// Id of the event the writer thread is writing (loom runs a model's threads on the
    /// test's OS thread; only the writer reads the clock).
    static WRITING: Cell<u8> = const { Cell::new(u8::MAX) };
}

/// A clock that ticks by one on every read and logs each reading with the id of the event
/// being written, so a test knows the exact time every event must carry: the last reading
/// its writer took (an attempt that lost its reservation to an interrupt reads again).
#[derive(Default)]
struct TaggedClock(Mutex<(u64, Vec<(u64, u8)>)>);

impl Clock for TaggedClock {
    fn now(&self) -> u64 {
        let mut g = self.0.lock().unwrap();
        g.0 += 1;
        let now = g.0;
        g.1.push((now, WRITING.with(Cell::get)));
        now
    }
}

impl TaggedClock {
    fn time_of(&self, id: u8) -> Option<u64> {
        let g = self.0.lock().unwrap();
        g.1.iter().rev().find(|r| r.1 == id).map(|r| r.0)
    }
}

type Tb = RingBuffer<HeapPages, TaggedClock>;

fn tagged(config: Config) -> Arc<Tb> {
    Arc::new(RingBuffer::new(config, HeapPages::default(), TaggedClock::default()).unwrap())
}

/// What one outer writer does, event by event: its id is its index.
#[derive(Clone, Copy)]
enum Op {
    Write(usize),
    /// Reserve, fill and commit.
    Reserve(usize),
    /// Reserve and drop: a discarded event, never seen.
    Discard(usize),
}

const NESTED_ID: u8 = 100;
/// The event of the writer nested in the nested one (depth 2: an NMI inside an irq).
const NMI_ID: u8 = 101;

struct Run {
    /// Ids whose write was accepted, in call order (the nested one where its call ended).
    accepted: Vec<u8>,
    dropped: u64,
    fired: bool,
}

/// Runs `ops` on `rb` with a nested write of `nested_len` bytes armed at interrupt point `k`.
fn run_with_interrupt(rb: &Arc<Tb>, ops: &[Op], nested_len: usize, k: usize) -> Run {
    let nested_ok: std::sync::Arc<Mutex<Option<bool>>> = Default::default();
    {
        let rb = rb.clone();
        let nested_ok = nested_ok.clone();
        interrupts::arm(k, move || {
            let outer = WRITING.with(|w| w.replace(NESTED_ID));
            let ok = rb.write(cpu0(), &event(NESTED_ID, nested_len)).is_ok();
            WRITING.with(|w| w.set(outer));
            *nested_ok.lock().unwrap() = Some(ok);
        });
    }
    let mut accepted = Vec::new();
    let mut dropped = 0;
    let mut note = |id: u8, ok: bool, accepted: &mut Vec<u8>| {
        if let Some(nested) = nested_ok.lock().unwrap().take() {
            if nested {
                accepted.push(NESTED_ID);
            } else {
                dropped += 1;
            }
        }
        if ok {
            accepted.push(id);
        } else if id != u8::MAX {
            dropped += 1;
        }
    };
    for (i, op) in ops.iter().enumerate() {
        let id = i as u8;
        WRITING.with(|w| w.set(id));
        match *op {
            Op::Write(len) => {
                let ok = rb.write(cpu0(), &event(id, len)).is_ok();
                note(id, ok, &mut accepted);
            }
            Op::Reserve(len) => {
                let ok = match rb.reserve(cpu0(), len) {
                    Ok(mut r) => {
                        r.payload_mut().copy_from_slice(&event(id, len));
                        r.commit();
                        true
                    }
                    Err(_) => false,
                };
                note(id, ok, &mut accepted);
            }
            Op::Discard(len) => {
                if let Ok(mut r) = rb.reserve(cpu0(), len) {
                    r.payload_mut()[0] = id;
                    drop(r);
                }
                note(u8::MAX, false, &mut accepted);
            }
        }
    }
    let fired = interrupts::disarm();
    Run {
        accepted,
        dropped,
        fired,
    }
}

/// Drains CPU 0: `(id, ts, lost)` of every event.
fn drain_ts(rb: &Tb, out: &mut Vec<(u8, u64, u64)>) {
    let mut r = rb.reader(0).unwrap();
    while let Some(e) = r.next_event() {
        out.push((e.payload[0], e.ts, e.lost));
    }
}

/// Time stamps strictly increase (the clock ticks on every read), and every accepted event
/// but the lost ones is there, once, in the order the buffer got them.
fn check_interrupted(rb: &Tb, run: &Run, seen: &[(u8, u64, u64)], k: usize) {
    let ctx = || {
        format!(
            "interrupt point {k}: accepted {:?}, seen {seen:?}",
            run.accepted
        )
    };
    for w in seen.windows(2) {
        assert!(w[0].1 < w[1].1, "time stamps not increasing: {}", ctx());
    }
    for &(id, ts, _) in seen {
        assert_eq!(Some(ts), rb.clock().time_of(id), "time of {id}: {}", ctx());
    }
    let st = rb.stats(0).unwrap();
    assert_eq!(st.entries, run.accepted.len() as u64, "{}", ctx());
    assert_eq!(st.dropped, run.dropped, "{}", ctx());
    assert_eq!(st.unread(), 0, "{}", ctx());
    assert_eq!(st.read, seen.len() as u64, "{}", ctx());
    let lost: u64 = seen.iter().map(|s| s.2).sum();
    assert_eq!(lost, st.overrun, "lost counts != overrun: {}", ctx());
    // The outer events keep their order; the nested one may land before the outer event it
    // interrupted (it interrupted the reservation) but appears at most once.
    let outer: Vec<u8> = seen
        .iter()
        .map(|s| s.0)
        .filter(|&i| i < NESTED_ID)
        .collect();
    assert!(outer.windows(2).all(|w| w[0] < w[1]), "{}", ctx());
    for id in [NESTED_ID, NMI_ID] {
        assert!(seen.iter().filter(|s| s.0 == id).count() <= 1, "{}", ctx());
    }
    for s in seen {
        assert!(run.accepted.contains(&s.0), "not accepted: {}", ctx());
    }
    if st.overrun == 0 {
        let mut got: Vec<u8> = seen.iter().map(|s| s.0).collect();
        let mut want = run.accepted.clone();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want, "missing without being lost: {}", ctx());
    }
}

/// Every interrupt point, single-threaded (one execution each).
fn every_point(config: Config, ops: &[Op], nested_len: usize) -> usize {
    let mut k = 0;
    loop {
        let fired = std::sync::Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let ops = ops.to_vec();
        loom::model(move || {
            let rb = tagged(config);
            let run = run_with_interrupt(&rb, &ops, nested_len, k);
            let mut seen = Vec::new();
            drain_ts(&rb, &mut seen);
            check_interrupted(&rb, &run, &seen, k);
            f.store(run.fired, Ordering::Relaxed);
        });
        if !fired.load(Ordering::Relaxed) {
            return k;
        }
        k += 1;
    }
}

/// Small events on the fast path, a page change, reserve/commit and a discard; room for all.
const MIXED: [Op; 7] = [
    Op::Write(8),
    Op::Write(64),
    Op::Reserve(12),
    Op::Write(1990),
    Op::Discard(20),
    Op::Write(1990),
    Op::Write(1),
];

#[test]
fn nested_writer_at_every_interrupt_point() {
    for mode in [Mode::Overwrite, Mode::ProducerConsumer] {
        let config = Config::new(1, 4).mode(mode);
        let points = every_point(config, &MIXED, 8);
        assert!(points > 30, "only {points} interrupt points");
        every_point(config, &MIXED, 1500);
    }
}

#[test]
fn nested_writer_at_every_interrupt_point_overwriting() {
    // One event per sub-buffer in a ring of two: every outer write pushes the head.
    let ops = [Op::Write(3000); 4];
    let points = every_point(Config::new(1, 2).mode(Mode::Overwrite), &ops, 3000);
    assert!(points > 20, "only {points} interrupt points");
    every_point(Config::new(1, 2).mode(Mode::Overwrite), &ops, 8);
}

/// The last write of a run, interrupted right after it entered by a nested writer that moves
/// the tail to the next sub-buffer: the outer write then lands there on the fast path, and
/// must still publish the sub-buffer the nested writer left (else the reader stops at it and
/// the nested event stays unread).
#[test]
fn nested_writer_moving_the_page_under_a_fast_write() {
    for mode in [Mode::Overwrite, Mode::ProducerConsumer] {
        let ops = [Op::Write(4000), Op::Write(8)];
        let points = every_point(Config::new(1, 4).mode(mode), &ops, 100);
        assert!(points > 10, "only {points} interrupt points");
    }
}

/// Every interrupt point of a short run with a reader draining concurrently.
#[test]
fn nested_writer_at_every_interrupt_point_vs_reader() {
    let ops = [Op::Write(8), Op::Write(2000), Op::Write(2000), Op::Write(8)];
    let mut k = 0;
    loop {
        let fired = std::sync::Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        loom::model(move || {
            let rb = tagged(Config::new(1, 2).mode(Mode::Overwrite));
            let w = {
                let rb = rb.clone();
                thread::spawn(move || run_with_interrupt(&rb, &ops, 8, k))
            };
            let mut seen = Vec::new();
            drain_ts(&rb, &mut seen);
            let run = w.join().unwrap();
            drain_ts(&rb, &mut seen);
            check_interrupted(&rb, &run, &seen, k);
            if run.fired {
                f.store(true, Ordering::Relaxed);
            }
        });
        if !fired.load(Ordering::Relaxed) {
            break;
        }
        k += 1;
    }
    assert!(k > 15, "only {k} interrupt points");
}

/// A cross-CPU call that is already on the CPU: runs the function right where it is called
/// (from an interrupt-point hook, i.e. as an IPI landing there, or between writes).
struct Here;

// SAFETY: only called on the writer's thread, from an interrupt-point hook (a simulated
// interrupt of the writer, which resumes after it) or between writes; it returns after `f`.
unsafe impl RunOn for Here {
    fn run_on(&self, _cpu: usize, f: &mut dyn FnMut()) {
        f()
    }
}

/// The reset's cross-CPU call landing at every interrupt point of the write path (the IPI of
/// `reset_cpu`): it either finds a writer section open and is refused (`Busy`, the buffer
/// untouched) or empties the buffer, and the writer it interrupted carries on consistently:
/// everything written before the op it interrupted is gone, everything after it is there,
/// the interrupted event is there or not, the counters match what can be read.
#[test]
fn reset_at_every_interrupt_point() {
    for mode in [Mode::Overwrite, Mode::ProducerConsumer] {
        let (mut k, mut resets, mut refusals) = (0, 0, 0);
        loop {
            let outcome = std::sync::Arc::new(Mutex::new(None));
            let o = outcome.clone();
            loom::model(move || {
                let rb = tagged(Config::new(1, 4).mode(mode));
                let current = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let reset = std::sync::Arc::new(Mutex::new(None));
                {
                    let (rb, current, reset) = (rb.clone(), current.clone(), reset.clone());
                    interrupts::arm(k, move || {
                        let r = rb.reset_cpu(0, &Here);
                        *reset.lock().unwrap() = Some((current.load(Ordering::Relaxed), r));
                    });
                }
                let mut accepted = Vec::new();
                for (i, op) in MIXED.iter().enumerate() {
                    let id = i as u8;
                    current.store(i, Ordering::Relaxed);
                    WRITING.with(|w| w.set(id));
                    let ok = match *op {
                        Op::Write(len) => rb.write(cpu0(), &event(id, len)).is_ok(),
                        Op::Reserve(len) => rb.reserve(cpu0(), len).is_ok_and(|mut r| {
                            r.payload_mut().copy_from_slice(&event(id, len));
                            r.commit();
                            true
                        }),
                        Op::Discard(len) => {
                            if let Ok(mut r) = rb.reserve(cpu0(), len) {
                                r.payload_mut()[0] = id;
                            }
                            false
                        }
                    };
                    if ok {
                        accepted.push(id);
                    }
                }
                interrupts::disarm();
                let mut seen = Vec::new();
                drain_ts(&rb, &mut seen);
                let ids: Vec<u8> = seen.iter().map(|s| s.0).collect();
                let result = *reset.lock().unwrap();
                let ctx = format!("point {k}, {mode:?}: reset {result:?}, seen {seen:?}");
                for w in seen.windows(2) {
                    assert!(w[0].1 < w[1].1, "time stamps not increasing: {ctx}");
                }
                for &(id, ts, lost) in &seen {
                    assert_eq!(Some(ts), rb.clock().time_of(id), "time of {id}: {ctx}");
                    assert_eq!(lost, 0, "{ctx}");
                }
                // The events that must be there: all accepted ones, or (after a reset during
                // op `at`) those accepted after `at`, plus possibly `at` itself.
                let must: Vec<u8> = match result {
                    Some((at, Ok(()))) => accepted
                        .iter()
                        .copied()
                        .filter(|&i| i as usize > at)
                        .collect(),
                    Some((_, Err(e))) => {
                        assert_eq!(e, oskit_ring_buffer::Error::Busy, "{ctx}");
                        accepted.clone()
                    }
                    None => accepted.clone(),
                };
                let extra: Vec<u8> = ids.iter().copied().filter(|i| !must.contains(i)).collect();
                match result {
                    Some((at, Ok(()))) => assert!(
                        extra.is_empty() || extra == [at as u8] && accepted.contains(&(at as u8)),
                        "{ctx}"
                    ),
                    _ => assert!(extra.is_empty(), "{ctx}"),
                }
                assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ctx}");
                assert!(must.iter().all(|i| ids.contains(i)), "missing: {ctx}");
                let st = rb.stats(0).unwrap();
                assert_eq!(
                    (st.entries, st.read),
                    (ids.len() as u64, ids.len() as u64),
                    "{ctx}"
                );
                assert_eq!((st.overrun, st.unread()), (0, 0), "{ctx}");
                // Recording is back on after the reset, refused or not.
                assert!(rb.is_recording(0).unwrap(), "{ctx}");
                *o.lock().unwrap() = result.map(|r| r.1.is_ok());
            });
            match *outcome.lock().unwrap() {
                None => break,
                Some(true) => resets += 1,
                Some(false) => refusals += 1,
            }
            k += 1;
        }
        assert!(k > 30, "only {k} interrupt points");
        // Both outcomes occur: the call lands inside writer sections and outside them.
        assert!(
            resets > 5 && refusals > 5,
            "{resets} resets, {refusals} refusals"
        );
    }
}

/// Depth 2: an irq writer at interrupt point `k` of the outer writer, and an NMI writer at
/// interrupt point `m` of the irq writer, for every pair. The outer writer holds a
/// reservation open while sub-buffers fill, so the nested writers push the head, meet each
/// other's pushes half done (and finish them), and publish nothing: every accepted event is
/// read or counted lost, nothing is refused (the ring has room for both nested events past
/// the open reservation), and the time stamps stay exact.
#[test]
fn nested_writers_two_deep_at_every_pair_of_points() {
    let ops = [
        Op::Write(3000),
        Op::Write(3000),
        Op::Reserve(3000),
        Op::Write(8),
        Op::Write(3000),
    ];
    let config = Config::new(1, 4).mode(Mode::Overwrite);
    let (mut k, mut pairs) = (0, 0);
    loop {
        let mut m = 0;
        loop {
            let fired = std::sync::Arc::new(Mutex::new((false, false)));
            let f = fired.clone();
            loom::model(move || {
                let rb = tagged(config);
                let nmi_ok: std::sync::Arc<Mutex<Option<bool>>> = Default::default();
                let irq_ok: std::sync::Arc<Mutex<Option<bool>>> = Default::default();
                {
                    let (rb, nmi_ok, irq_ok) = (rb.clone(), nmi_ok.clone(), irq_ok.clone());
                    interrupts::arm(k, move || {
                        let outer = WRITING.with(|w| w.replace(NESTED_ID));
                        {
                            let (rb, nmi_ok) = (rb.clone(), nmi_ok.clone());
                            interrupts::arm(m, move || {
                                let irq = WRITING.with(|w| w.replace(NMI_ID));
                                let ok = rb.write(cpu0(), &event(NMI_ID, 3000)).is_ok();
                                WRITING.with(|w| w.set(irq));
                                *nmi_ok.lock().unwrap() = Some(ok);
                            });
                        }
                        let ok = rb.write(cpu0(), &event(NESTED_ID, 3000)).is_ok();
                        // The NMI only fires inside the irq writer.
                        let nmi_fired = interrupts::disarm();
                        WRITING.with(|w| w.set(outer));
                        *irq_ok.lock().unwrap() = Some(ok);
                        if !nmi_fired {
                            *nmi_ok.lock().unwrap() = None;
                        }
                    });
                }
                let mut accepted = Vec::new();
                let mut dropped = 0;
                for (i, op) in ops.iter().enumerate() {
                    let id = i as u8;
                    WRITING.with(|w| w.set(id));
                    let ok = match *op {
                        Op::Write(len) => rb.write(cpu0(), &event(id, len)).is_ok(),
                        Op::Reserve(len) => rb.reserve(cpu0(), len).is_ok_and(|mut r| {
                            r.payload_mut().copy_from_slice(&event(id, len));
                            r.commit();
                            true
                        }),
                        Op::Discard(_) => unreachable!(),
                    };
                    for (nid, slot) in [(NMI_ID, &nmi_ok), (NESTED_ID, &irq_ok)] {
                        match slot.lock().unwrap().take() {
                            Some(true) => accepted.push(nid),
                            Some(false) => dropped += 1,
                            None => {}
                        }
                    }
                    if ok {
                        accepted.push(id);
                    } else {
                        dropped += 1;
                    }
                }
                let irq_fired = interrupts::disarm();
                let run = Run {
                    accepted,
                    dropped,
                    fired: irq_fired,
                };
                let mut seen = Vec::new();
                drain_ts(&rb, &mut seen);
                check_interrupted(&rb, &run, &seen, k * 1000 + m);
                assert_eq!(
                    run.dropped, 0,
                    "pair ({k}, {m}): {:?} {seen:?}",
                    run.accepted
                );
                let nmi_ran = run.accepted.contains(&NMI_ID);
                *f.lock().unwrap() = (irq_fired, nmi_ran);
            });
            let (irq_fired, nmi_ran) = *fired.lock().unwrap();
            if !irq_fired {
                assert!(pairs > 500, "only {pairs} pairs of interrupt points");
                return;
            }
            if !nmi_ran {
                break;
            }
            pairs += 1;
            m += 1;
        }
        k += 1;
    }
}
