//! Resets from the CPU itself and from another CPU through a cross-CPU call ([`RunOn`]).

mod common;

use std::{
    cell::Cell,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
};

use common::{HeapPages, cpu0};
use oskit_ring_buffer::{
    Config, Error, LocalCpu, MapPage, MappedReader, Mode, RingBuffer, RunOn, Stats,
    sim::{CountingClock, ManualClock},
};

/// A cross-CPU call to the calling thread itself, which is "the CPU": the first `busy_calls`
/// calls land inside an open reservation (as an IPI may), the rest between writers.
struct SelfCall<'a> {
    rb: &'a RingBuffer<&'a HeapPages, &'a ManualClock>,
    busy_calls: Cell<u32>,
    calls: Cell<u32>,
}

// SAFETY: `f` runs on the calling thread, the only writer of CPU 0, either between its writes
// or inside a reservation that is committed only after `f` returned: the nesting of an IPI.
unsafe impl RunOn for SelfCall<'_> {
    fn run_on(&self, cpu: usize, f: &mut dyn FnMut()) {
        assert_eq!(cpu, 0);
        self.calls.set(self.calls.get() + 1);
        if self.busy_calls.get() > 0 {
            self.busy_calls.set(self.busy_calls.get() - 1);
            let mut r = self.rb.reserve(cpu0(), 4).unwrap();
            r.payload_mut().copy_from_slice(b"irq!");
            f();
            r.commit();
        } else {
            f();
        }
    }
}

#[test]
fn reset_cpu_retries_when_it_lands_inside_a_writer() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let rb = RingBuffer::new(Config::new(1, 3), &alloc, &clock).unwrap();
    for i in 0..300u32 {
        clock.advance(1);
        rb.write(cpu0(), &i.to_le_bytes()).unwrap();
    }
    let call = SelfCall {
        rb: &rb,
        busy_calls: Cell::new(2),
        calls: Cell::new(0),
    };
    rb.reset_cpu(0, &call).unwrap();
    assert_eq!(
        call.calls.get(),
        3,
        "two calls inside a writer, then the reset"
    );
    assert_eq!(rb.stats(0).unwrap(), Stats::default());
    assert_eq!(rb.is_recording(0), Ok(true), "recording enabled again");
    assert!(rb.reader(0).unwrap().next_event().is_none());
    clock.advance(1);
    rb.write(cpu0(), b"new!").unwrap();
    let mut r = rb.reader(0).unwrap();
    assert_eq!(r.next_event().unwrap().payload, b"new!");
    assert!(r.next_event().is_none());
    drop(r);
    assert_eq!(rb.reset_cpu(1, &call), Err(Error::InvalidArgument));
    // Every call lands inside a writer: gives up.
    call.busy_calls.set(u32::MAX);
    assert_eq!(rb.reset_cpu(0, &call), Err(Error::Busy));
    assert_eq!(rb.stats(0).unwrap().entries, 1 + 4096, "not reset");
}

#[test]
fn reset_keeps_the_mapping_valid() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let rb = RingBuffer::new(Config::new(1, 4), &alloc, &clock).unwrap();
    for i in 0..40u8 {
        clock.advance(1);
        rb.write(cpu0(), &[i; 300]).unwrap();
    }
    rb.map(0).unwrap();
    rb.map_get_reader(0).unwrap();
    let pages = |rb: &RingBuffer<_, _>| -> Vec<_> {
        (0..5)
            .map(|id| rb.map_page(0, MapPage::Subbuf { id, page: 0 }).unwrap())
            .collect()
    };
    let before = pages(&rb);
    rb.reset(cpu0()).unwrap();
    assert_eq!(
        pages(&rb),
        before,
        "a user mapping keeps its pages in ID order"
    );
    // The mapped consumer carries on after the reset.
    let view = rb.mapped_view(0).unwrap();
    let mut reader = MappedReader::new(&view, || rb.map_get_reader(0)).unwrap();
    assert_eq!(reader.meta().entries, 0);
    for i in 0..30u8 {
        clock.advance(1);
        rb.write(cpu0(), &[100 + i; 300]).unwrap();
    }
    let mut buf = vec![0; 4096];
    let mut got = Vec::new();
    while let Some(ev) = reader.next_event(&mut buf).unwrap() {
        got.push((buf[0], ev.lost));
    }
    assert_eq!(got, (100..130).map(|i| (i, 0)).collect::<Vec<_>>());
    let meta = reader.meta();
    assert_eq!((meta.entries, meta.overrun, meta.read), (30, 0, 30));
}

/// A CPU served by a thread: it writes events and runs cross-CPU calls between (and sometimes
/// inside) its writes, like an IPI handler.
struct Mailbox {
    slot: Mutex<Option<SendPtr>>,
    done: AtomicBool,
}

struct SendPtr(*mut (dyn FnMut() + 'static));
// SAFETY: the pointer is only used while the poster waits for it (see `run_on`).
unsafe impl Send for SendPtr {}

impl Mailbox {
    fn serve(&self) {
        let call = self.slot.lock().unwrap().take();
        if let Some(p) = call {
            // SAFETY: the poster waits in `run_on` until `done`, so the closure is alive.
            unsafe { (*p.0)() };
            self.done.store(true, Ordering::Release);
        }
    }
}

// SAFETY: `serve` runs the function on the CPU's thread between its writes or inside a
// reservation committed afterwards, and `run_on` waits until it has run.
unsafe impl RunOn for Mailbox {
    fn run_on(&self, _cpu: usize, f: &mut dyn FnMut()) {
        let p: *mut (dyn FnMut() + '_) = f;
        // SAFETY: only the lifetime is erased; the closure outlives its use (we wait below).
        let p: *mut (dyn FnMut() + 'static) = unsafe { std::mem::transmute(p) };
        self.done.store(false, Ordering::Release);
        *self.slot.lock().unwrap() = Some(SendPtr(p));
        while !self.done.load(Ordering::Acquire) {
            thread::yield_now();
        }
    }
}

#[test]
fn reset_cpu_from_another_thread_while_the_cpu_writes() {
    let alloc = HeapPages::default();
    let clock = CountingClock::new(1);
    let rb = RingBuffer::new(Config::new(1, 3).mode(Mode::Overwrite), &alloc, &clock).unwrap();
    let mailbox = Mailbox {
        slot: Mutex::new(None),
        done: AtomicBool::new(false),
    };
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: this thread is CPU 0's only writer.
            let cpu = unsafe { LocalCpu::new(0) };
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let mut r = rb.reserve(cpu, 16).unwrap();
                r.payload_mut()[..8].copy_from_slice(&i.to_le_bytes());
                if i % 3 == 0 {
                    mailbox.serve(); // an IPI inside the writer
                }
                r.commit();
                i += 1;
                mailbox.serve(); // an IPI between writers
            }
            written.store(i, Ordering::Release);
        });
        let rounds = if cfg!(miri) { 3 } else { 200 };
        for _ in 0..rounds {
            rb.reset_cpu(0, &mailbox).unwrap();
            // Right after a reset only events written since are in the buffer, in order,
            // consecutive (or reported lost), intact.
            let mut r = rb.reader(0).unwrap();
            let mut prev = None;
            while let Some(e) = r.next_event() {
                let n = u64::from_le_bytes(e.payload[..8].try_into().unwrap());
                assert_eq!(&e.payload[8..], &[0; 8]);
                if let Some(p) = prev {
                    assert_eq!(n, p + 1 + e.lost, "reordered or lost uncounted");
                }
                prev = Some(n);
            }
        }
        stop.store(true, Ordering::Release);
    });
    let st = rb.stats(0).unwrap();
    assert!(st.entries <= written.load(Ordering::Acquire));
    assert_eq!(
        st.unread() + st.read + st.overrun,
        st.entries,
        "counters add up"
    );
}

#[test]
fn reset_empties_every_state() {
    // Overwrite with lost events pending, a partly read reader page and the writer anywhere:
    // after the reset nothing old comes back, nothing is reported lost.
    for skip in 0..12u32 {
        let alloc = HeapPages::default();
        let clock = ManualClock::new(0);
        let rb = RingBuffer::new(Config::new(1, 3), &alloc, &clock).unwrap();
        for i in 0..(10 + skip * 3) {
            clock.advance(1);
            rb.write(cpu0(), &[i as u8; 900]).unwrap();
        }
        for _ in 0..skip % 4 {
            rb.reader(0).unwrap().next_event();
        }
        rb.reset(cpu0()).unwrap();
        assert_eq!(rb.stats(0).unwrap(), Stats::default());
        for i in 0..20u8 {
            clock.advance(1);
            rb.write(cpu0(), &[200 + i; 500]).unwrap();
        }
        let mut r = rb.reader(0).unwrap();
        let mut got = Vec::new();
        while let Some(e) = r.next_event() {
            got.push((e.payload[0], e.lost));
        }
        let st = rb.stats(0).unwrap();
        // 20 events of 508 bytes: 8 to a sub-buffer; whatever was overwritten is reported.
        let first = got[0].0;
        assert_eq!(
            got[0].1,
            u64::from(first - 200),
            "skip {skip}: lost at the start"
        );
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            (first..220).collect::<Vec<_>>(),
            "skip {skip}"
        );
        assert_eq!(st.overrun, u64::from(first - 200), "skip {skip}");
        assert_eq!(st.unread(), 0);
    }
}
