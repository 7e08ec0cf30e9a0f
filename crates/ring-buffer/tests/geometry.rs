//! Resize (number of sub-buffers, one CPU or all) and sub-buffer order changes: what happens to
//! the events, the counters, the memory, `Busy` while mapped and `NoMemory` changing nothing.

mod common;

use std::{collections::VecDeque, sync::atomic::Ordering};

use common::{HeapPages, Rng, cpu0, payload, stored};
use oskit_ring_buffer::{
    Clock, Config, Error, LocalCpu, MapRegion, Mode, PageAlloc, RingBuffer, Stats,
    format::{TraceBufferMeta, max_payload},
    sim::{FailingAlloc, ManualClock},
};
use zerocopy::FromBytes;

fn cpu1() -> LocalCpu {
    // SAFETY: the tests that use it write CPU 1 from their own thread only.
    unsafe { LocalCpu::new(1) }
}

/// Consumes everything: `(ts, payload, lost)` of each event.
fn drain<A: PageAlloc, C: Clock>(rb: &RingBuffer<A, C>, cpu: usize) -> Vec<(u64, Vec<u8>, u64)> {
    let mut r = rb.reader(cpu).unwrap();
    let mut out = Vec::new();
    while let Some(e) = r.next_event() {
        out.push((e.ts, e.payload.to_vec(), e.lost));
    }
    out
}

/// Writes `n` events of `len` bytes, one clock tick apart; event `i` starts with byte `i`.
fn fill<A: PageAlloc>(rb: &RingBuffer<A, &ManualClock>, cpu: LocalCpu, n: usize, len: usize) {
    for _ in 0..n {
        rb.clock().advance(1);
        let i = rb.clock().now() as u8;
        let mut data = vec![0xcd; len];
        data[0] = i;
        rb.write(cpu, &data).unwrap();
    }
}

fn firsts(events: &[(u64, Vec<u8>, u64)]) -> Vec<(u8, u64)> {
    events.iter().map(|e| (e.1[0], e.2)).collect()
}

// 1000-byte payloads take 1008 bytes: four to a 4 KiB sub-buffer.
const LEN: usize = 1000;

#[test]
fn growing_keeps_every_event_and_adds_room() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let mut rb = RingBuffer::new(
        Config::new(1, 2).mode(Mode::ProducerConsumer),
        &alloc,
        &clock,
    )
    .unwrap();
    fill(&rb, cpu0(), 8, LEN); // both sub-buffers full
    assert_eq!(rb.write(cpu0(), &[0; LEN]), Err(Error::Full), "ring full");
    let before = rb.stats(0).unwrap();
    let pages = alloc.outstanding.load(Ordering::Relaxed);
    rb.resize(5).unwrap();
    assert_eq!(rb.nr_subbufs(0), Ok(5));
    assert_eq!(rb.nr_subbufs(0).unwrap(), 5);
    assert_eq!(rb.stats(0).unwrap(), before, "growing changes no counter");
    assert_eq!(
        alloc.outstanding.load(Ordering::Relaxed),
        pages + 3,
        "three new sub-buffers (the bookkeeping array keeps its one page)"
    );
    // Now 12 more fit: the three new sub-buffers.
    fill(&rb, cpu0(), 12, LEN);
    assert_eq!(rb.write(cpu0(), &[0; LEN]), Err(Error::Full));
    let got = drain(&rb, 0);
    let want: Vec<(u8, u64)> = (1..=20).map(|i| (i, 0)).collect();
    assert_eq!(firsts(&got), want, "nothing lost, nothing reordered");
    assert_eq!(got[0].0, 1);
    assert_eq!(got[19].0, 20);
    let st = rb.stats(0).unwrap();
    assert_eq!(
        (st.entries, st.read, st.overrun, st.unread()),
        (20, 20, 0, 0)
    );
    drop(rb);
    assert_eq!(alloc.outstanding.load(Ordering::Relaxed), 0, "leak");
}

#[test]
fn growing_a_full_overwrite_ring_stops_the_overwriting() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let mut rb = RingBuffer::new(Config::new(1, 3), &alloc, &clock).unwrap();
    fill(&rb, cpu0(), 12, LEN); // three full sub-buffers, the tail at the end of the last
    assert_eq!(rb.stats(0).unwrap().overrun, 0);
    rb.resize(4).unwrap();
    fill(&rb, cpu0(), 4, LEN); // goes into the new sub-buffer, not over the head
    assert_eq!(rb.stats(0).unwrap().overrun, 0);
    let got = drain(&rb, 0);
    assert_eq!(firsts(&got), (1..=16).map(|i| (i, 0)).collect::<Vec<_>>());
}

#[test]
fn shrinking_drops_the_oldest_subbufs_as_overrun() {
    for mode in [Mode::Overwrite, Mode::ProducerConsumer] {
        let alloc = HeapPages::default();
        let clock = ManualClock::new(0);
        let mut rb = RingBuffer::new(Config::new(1, 6).mode(mode), &alloc, &clock).unwrap();
        fill(&rb, cpu0(), 22, LEN); // five full sub-buffers and two events in the sixth
        let pages = alloc.outstanding.load(Ordering::Relaxed);
        rb.resize(3).unwrap();
        assert_eq!(
            alloc.outstanding.load(Ordering::Relaxed),
            pages - 3,
            "freed"
        );
        let st = rb.stats(0).unwrap();
        // The two oldest sub-buffers cannot stay: 8 events dropped, counted as overrun.
        assert_eq!(
            (st.entries, st.overrun, st.read, st.unread()),
            (22, 12, 0, 10),
            "{mode:?}"
        );
        let got = drain(&rb, 0);
        let mut want = vec![(13, 12)];
        want.extend((14..=22).map(|i| (i, 0)));
        assert_eq!(firsts(&got), want, "{mode:?}: newest kept, loss reported");
        let st = rb.stats(0).unwrap();
        assert_eq!(
            (st.entries, st.overrun, st.read, st.unread()),
            (22, 12, 10, 0)
        );
        // The writer is on the reader sub-buffer (two events, room for two more); the ring
        // of three takes twelve: 14 events fit before the ring is full.
        fill(&rb, cpu0(), 14, LEN);
        assert_eq!(rb.stats(0).unwrap().overrun, 12, "{mode:?}");
        match mode {
            Mode::Overwrite => {
                fill(&rb, cpu0(), 1, LEN);
                assert_eq!(rb.stats(0).unwrap().overrun, 12 + 4, "head pushed");
            }
            Mode::ProducerConsumer => {
                assert_eq!(rb.write(cpu0(), &[0; LEN]), Err(Error::Full))
            }
        }
    }
}

#[test]
fn shrinking_keeps_the_partly_read_reader_subbuf() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let mut rb = RingBuffer::new(Config::new(1, 6), &alloc, &clock).unwrap();
    fill(&rb, cpu0(), 22, LEN);
    {
        let mut r = rb.reader(0).unwrap();
        assert_eq!(r.next_event().unwrap().payload[0], 1);
        assert_eq!(r.next_event().unwrap().payload[0], 2);
    }
    // Ring now: sub-buffers with 5-8, 9-12, 13-16, 17-20, 21-22 and the old (read) reader.
    rb.resize(2).unwrap();
    let st = rb.stats(0).unwrap();
    assert_eq!((st.overrun, st.read, st.unread()), (12, 2, 8));
    let got = drain(&rb, 0);
    assert_eq!(
        firsts(&got),
        [
            (3, 0),
            (4, 0),
            (17, 12),
            (18, 0),
            (19, 0),
            (20, 0),
            (21, 0),
            (22, 0)
        ],
        "the reader's events first, then the loss"
    );
}

#[test]
fn shrinking_removes_empty_subbufs_first() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let mut rb = RingBuffer::new(Config::new(1, 8), &alloc, &clock).unwrap();
    fill(&rb, cpu0(), 6, LEN); // two sub-buffers used
    rb.resize(2).unwrap();
    assert_eq!(rb.stats(0).unwrap().overrun, 0);
    fill(&rb, cpu0(), 1, LEN);
    assert_eq!(
        firsts(&drain(&rb, 0)),
        (1..=7).map(|i| (i, 0)).collect::<Vec<_>>()
    );
    // The writer on the reader sub-buffer (everything read): any ring sub-buffer may go.
    rb.resize(5).unwrap();
    fill(&rb, cpu0(), 1, LEN);
    assert_eq!(firsts(&drain(&rb, 0)), [(8, 0)]);
    rb.resize(2).unwrap();
    fill(&rb, cpu0(), 8, LEN); // two ring sub-buffers' worth: nothing overwritten
    assert_eq!(
        firsts(&drain(&rb, 0)),
        (9..=16).map(|i| (i, 0)).collect::<Vec<_>>()
    );
    assert_eq!(rb.stats(0).unwrap().overrun, 0);
}

#[test]
fn resize_one_cpu_or_all() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let mut rb = RingBuffer::new(Config::new(2, 3), &alloc, &clock).unwrap();
    fill(&rb, cpu0(), 5, LEN);
    fill(&rb, cpu1(), 5, LEN);
    rb.resize_cpu(1, 7).unwrap();
    assert_eq!((rb.nr_subbufs(0), rb.nr_subbufs(1)), (Ok(3), Ok(7)));
    assert_eq!(rb.nr_subbufs(2), Err(Error::InvalidArgument));
    assert_eq!(rb.resize_cpu(2, 4), Err(Error::InvalidArgument));
    assert_eq!(rb.map_layout(1).unwrap().total_pages(), 9);
    assert_eq!(rb.map_layout(0).unwrap().total_pages(), 5);
    // The mapping of the resized CPU has its own geometry.
    rb.map(1).unwrap();
    {
        let view = rb.mapped_view(1).unwrap();
        assert_eq!(view.len(), 9 * 4096);
        let mut raw = [0u8; 80];
        view.read(0, &mut raw).unwrap();
        let meta = TraceBufferMeta::read_from_bytes(&raw).unwrap();
        assert_eq!((meta.nr_subbufs, meta.entries), (8, 5));
    }
    rb.unmap(1).unwrap();
    rb.resize(2).unwrap();
    assert_eq!((rb.nr_subbufs(0), rb.nr_subbufs(1)), (Ok(2), Ok(2)));
    for cpu in 0..2u8 {
        let got = drain(&rb, usize::from(cpu));
        // Both used sub-buffers stay (events 1-5 on CPU 0, 6-10 on CPU 1).
        let first = 1 + 5 * cpu;
        let want: Vec<(u8, u64)> = (first..first + 5).map(|i| (i, 0)).collect();
        assert_eq!(firsts(&got), want);
    }
    assert_eq!(rb.resize(1), Err(Error::InvalidArgument));
    assert_eq!(rb.resize(65_535), Err(Error::InvalidArgument));
    // The same size is a no-op.
    rb.resize(2).unwrap();
}

#[test]
fn geometry_changes_are_busy_while_mapped() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let mut rb = RingBuffer::new(Config::new(2, 3), &alloc, &clock).unwrap();
    let other = RingBuffer::new(Config::new(2, 3), &alloc, &clock).unwrap();
    fill(&rb, cpu0(), 5, LEN);
    let st = rb.stats(0).unwrap();
    rb.map(0).unwrap();
    assert_eq!(rb.resize(4), Err(Error::Busy));
    assert_eq!(rb.resize_cpu(0, 4), Err(Error::Busy));
    assert_eq!(rb.set_subbuf_order(1), Err(Error::Busy));
    // SAFETY: this thread is the only writer of both buffers and is not writing.
    unsafe {
        assert_eq!(rb.swap_cpu(&other, 0), Err(Error::Busy));
        assert_eq!(other.swap_cpu(&rb, 0), Err(Error::Busy));
    }
    // Busy changed nothing.
    assert_eq!((rb.nr_subbufs(0), rb.subbuf_size()), (Ok(3), 4096));
    assert_eq!(rb.stats(0).unwrap(), st);
    // Another CPU's buffer is not mapped: it can be resized.
    rb.resize_cpu(1, 4).unwrap();
    rb.unmap(0).unwrap();
    rb.resize(4).unwrap();
    rb.set_subbuf_order(1).unwrap();
    assert_eq!(rb.subbuf_size(), 8192);
}

#[test]
fn subbuf_order_change_reallocates_and_discards() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let mut rb = RingBuffer::new(Config::new(2, 8), &alloc, &clock).unwrap();
    fill(&rb, cpu0(), 9, LEN);
    let pages = alloc.outstanding.load(Ordering::Relaxed);
    // The same order: nothing happens.
    rb.set_subbuf_order(0).unwrap();
    assert_eq!(rb.stats(0).unwrap().entries, 9);
    assert_eq!(rb.set_subbuf_order(9), Err(Error::InvalidArgument));
    rb.set_subbuf_order(2).unwrap();
    assert_eq!(rb.subbuf_size(), 16384);
    assert_eq!(rb.max_payload(), max_payload(16384));
    // Same bytes per CPU: 8 x 4 KiB = 2 x 16 KiB.
    assert_eq!((rb.nr_subbufs(0), rb.nr_subbufs(1)), (Ok(2), Ok(2)));
    assert_eq!(rb.stats(0).unwrap(), Stats::default(), "counters zeroed");
    assert!(
        rb.reader(0).unwrap().next_event().is_none(),
        "data discarded"
    );
    // Sub-buffers (2 x (2 + 1) x 4 pages) replace 2 x (8 + 1) pages; arrays keep their page.
    assert_eq!(alloc.outstanding.load(Ordering::Relaxed), pages - 18 + 24);
    let big = payload(7, rb.max_payload());
    rb.write(cpu0(), &big).unwrap();
    assert_eq!(
        rb.write(cpu0(), &vec![0; rb.max_payload() + 1]),
        Err(Error::EventTooLarge)
    );
    rb.write(cpu1(), b"one").unwrap();
    let got = drain(&rb, 0);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, stored(&big));
    assert_eq!(drain(&rb, 1)[0].1, b"one\0");
    // The mapping shows the new size.
    rb.map(0).unwrap();
    {
        let view = rb.mapped_view(0).unwrap();
        let mut raw = [0u8; 80];
        view.read(0, &mut raw).unwrap();
        let meta = TraceBufferMeta::read_from_bytes(&raw).unwrap();
        assert_eq!(
            (meta.meta_page_size, meta.subbuf_size, meta.nr_subbufs),
            (16384, 16384, 3)
        );
        assert_eq!(view.len(), 4 * 16384);
    }
    rb.unmap(0).unwrap();
    // Down to 1 MiB... and back: 2 x 16 KiB round up to one 1 MiB sub-buffer, so 2.
    rb.set_subbuf_order(8).unwrap();
    assert_eq!(rb.nr_subbufs(0), Ok(2));
    rb.set_subbuf_order(0).unwrap();
    assert_eq!(rb.nr_subbufs(0), Ok(512));
    fill(&rb, cpu0(), 3, LEN);
    assert_eq!(drain(&rb, 0).len(), 3);
    drop(rb);
    assert_eq!(alloc.outstanding.load(Ordering::Relaxed), 0, "leak");
}

/// Builds the same buffer twice from a seed: some events written, some read.
fn scenario<A: PageAlloc>(alloc: A, clock: &ManualClock, seed: u64) -> RingBuffer<A, &ManualClock> {
    let rb = RingBuffer::new(Config::new(2, 3), alloc, clock).unwrap();
    let mut rng = Rng::new(seed);
    for i in 0..40u64 {
        clock.advance(1 + rng.below(100));
        let cpu = if rng.chance(50) { cpu0() } else { cpu1() };
        rb.write(cpu, &payload(i, rng.below(900) as usize)).unwrap();
        if rng.chance(10) {
            rb.reader(cpu.id()).unwrap().next_event();
        }
    }
    rb
}

/// Everything observable about a buffer, consuming it: geometry, counters, every event.
fn observe<A: PageAlloc>(rb: &RingBuffer<A, &ManualClock>) -> Vec<String> {
    let mut out = vec![format!(
        "size {} subbufs {:?} {:?}",
        rb.subbuf_size(),
        rb.nr_subbufs(0),
        rb.nr_subbufs(1)
    )];
    for cpu in 0..2 {
        out.push(format!("{:?}", rb.stats(cpu).unwrap()));
        out.extend(drain(rb, cpu).iter().map(|e| format!("{e:?}")));
    }
    // The writers keep working where they were.
    for cpu in [cpu0(), cpu1()] {
        rb.clock().advance(5);
        rb.write(cpu, b"after").unwrap();
        out.extend(drain(rb, cpu.id()).iter().map(|e| format!("{e:?}")));
    }
    out
}

#[test]
fn no_memory_leaves_the_buffer_exactly_as_it_was() {
    type Op = fn(&mut RingBuffer<FailingAlloc<&HeapPages>, &ManualClock>) -> Result<(), Error>;
    let ops: [(&str, Op); 4] = [
        ("grow all", |rb| rb.resize(9)),
        ("grow one", |rb| rb.resize_cpu(1, 6)),
        ("shrink all", |rb| rb.resize(2)),
        ("order", |rb| rb.set_subbuf_order(1)),
    ];
    for (name, op) in ops {
        let heap = HeapPages::default();
        let clock_ref = ManualClock::new(0);
        let reference = observe(&scenario(&heap, &clock_ref, 7));
        let mut failures = 0;
        // Every failure point; under miri (slow) the first two and then success.
        let points: Box<dyn Iterator<Item = u64>> = if cfg!(miri) {
            Box::new([0, 1, u64::MAX].into_iter())
        } else {
            Box::new(0..)
        };
        for k in points {
            let clock = ManualClock::new(0);
            let alloc = FailingAlloc::new(&heap);
            let mut rb = scenario(alloc, &clock, 7);
            let pages = heap.outstanding.load(Ordering::Relaxed);
            rb.allocator().fail_after(k);
            match op(&mut rb) {
                Err(Error::NoMemory) => {
                    failures += 1;
                    assert_eq!(
                        heap.outstanding.load(Ordering::Relaxed),
                        pages,
                        "{name}: failure after {k} allocations leaked or freed pages"
                    );
                    rb.allocator().heal();
                    assert_eq!(
                        observe(&rb),
                        reference,
                        "{name}: failure after {k} allocations changed the buffer"
                    );
                }
                Ok(()) => break,
                Err(e) => panic!("{name}: {e}"),
            }
        }
        assert!(failures > 0, "{name}: never failed");
        assert_eq!(heap.outstanding.load(Ordering::Relaxed), 0, "{name}: leak");
    }
}

/// Random writes, reads, resizes (one CPU or all), order changes and mappings against a model
/// queue: every event comes out once, in order, intact, or is reported lost exactly where it
/// went missing; the counters always add up.
#[allow(clippy::needless_range_loop)] // CPU numbers index the model and the buffer alike
fn resize_model(seed: u64, mode: Mode) {
    let mut rng = Rng::new(seed);
    let alloc = HeapPages::default();
    let clock = ManualClock::new(1 << 30);
    let mut rb = RingBuffer::new(
        Config::new(2, 2 + rng.below(4) as usize).mode(mode),
        &alloc,
        &clock,
    )
    .unwrap();
    let mut model: [VecDeque<(u64, Vec<u8>)>; 2] = Default::default();
    let mut lost_seen = [0u64; 2];
    let mut seq = 0u64;
    let ops = if cfg!(miri) { 150 } else { 1500 };
    for _ in 0..ops {
        let cpu = rng.below(2) as usize;
        let token = if cpu == 0 { cpu0() } else { cpu1() };
        match rng.below(100) {
            0..=59 => {
                let gap = if rng.chance(5) { 1 << 30 } else { 300 };
                clock.advance(1 + rng.below(gap));
                let max = rb.max_payload();
                let len = match rng.below(8) {
                    0 => max,
                    1 => 0,
                    _ => rng.below(1200) as usize,
                };
                let data = payload(seq, len);
                seq += 1;
                match rb.write(token, &data) {
                    Ok(()) => model[cpu].push_back((clock.now(), data)),
                    Err(Error::Full) => assert_eq!(mode, Mode::ProducerConsumer),
                    Err(e) => panic!("seed {seed}: {e}"),
                }
            }
            60..=79 => {
                let mut r = rb.reader(cpu).unwrap();
                for _ in 0..rng.below(30) {
                    let Some(ev) = r.next_event() else { break };
                    let pos = model[cpu]
                        .iter()
                        .position(|(ts, _)| *ts == ev.ts)
                        .unwrap_or_else(|| panic!("seed {seed}: unknown event {}", ev.ts));
                    assert_eq!(pos as u64, ev.lost, "seed {seed}: lost != skipped");
                    lost_seen[cpu] += ev.lost;
                    model[cpu].drain(..pos);
                    let (_, data) = model[cpu].pop_front().unwrap();
                    assert_eq!(ev.payload, stored(&data), "seed {seed}: payload");
                }
            }
            80..=91 => {
                let n = 2 + rng.below(7) as usize;
                let before: Vec<Stats> = (0..2).map(|c| rb.stats(c).unwrap()).collect();
                let all = rng.chance(50);
                if all {
                    rb.resize(n).unwrap();
                } else {
                    rb.resize_cpu(cpu, n).unwrap();
                }
                for c in 0..2 {
                    let (b, a) = (before[c], rb.stats(c).unwrap());
                    assert_eq!(
                        (a.entries, a.read, a.dropped),
                        (b.entries, b.read, b.dropped)
                    );
                    assert!(a.overrun >= b.overrun);
                    if !all && c != cpu {
                        assert_eq!(a, b, "seed {seed}: resize of one CPU touched another");
                    }
                }
                if all || cpu == 0 {
                    assert_eq!(rb.nr_subbufs(0), Ok(n));
                }
            }
            92..=94 => {
                // Mapped: every geometry change is Busy and changes nothing.
                rb.map(cpu).unwrap();
                let st = rb.stats(cpu).unwrap();
                let n = 2 + rng.below(5) as usize;
                assert_eq!(rb.resize_cpu(cpu, n), Err(Error::Busy));
                assert_eq!(rb.resize(n), Err(Error::Busy));
                let other = if rb.subbuf_size() == 4096 { 1 } else { 0 };
                assert_eq!(rb.set_subbuf_order(other), Err(Error::Busy));
                assert_eq!(rb.stats(cpu).unwrap(), st);
                rb.unmap(cpu).unwrap();
            }
            95..=96 => {
                let order = rng.below(3) as u32;
                let changes = order != rb.subbuf_size().trailing_zeros() - 12;
                rb.set_subbuf_order(order).unwrap();
                if changes {
                    for c in 0..2 {
                        model[c].clear();
                        lost_seen[c] = 0;
                        assert_eq!(rb.stats(c).unwrap(), Stats::default());
                    }
                }
            }
            _ => {}
        }
        for c in 0..2 {
            // Unread events plus losses not yet reported are exactly what the model holds.
            let st = rb.stats(c).unwrap();
            assert_eq!(
                model[c].len() as u64,
                st.unread() + st.overrun - lost_seen[c],
                "seed {seed}: cpu {c} counters"
            );
        }
    }
    for c in 0..2 {
        let mut r = rb.reader(c).unwrap();
        while let Some(ev) = r.next_event() {
            let pos = model[c].iter().position(|(ts, _)| *ts == ev.ts).unwrap();
            assert_eq!(pos as u64, ev.lost, "seed {seed}: lost != skipped");
            model[c].drain(..=pos);
        }
        drop(r);
        assert_eq!(rb.stats(c).unwrap().unread(), 0);
    }
}

#[test]
fn resize_matches_model_overwrite() {
    for seed in 0..if cfg!(miri) { 1 } else { 30 } {
        resize_model(seed, Mode::Overwrite);
    }
}

#[test]
fn resize_matches_model_producer_consumer() {
    for seed in 100..if cfg!(miri) { 101 } else { 130 } {
        resize_model(seed, Mode::ProducerConsumer);
    }
}
