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
