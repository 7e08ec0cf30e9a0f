//! `read_page`: zero-copy page exchange versus copying, always copying while mapped, lost
//! events in the page exactly as Linux formats them, and a model of consumption by pages.

mod common;

use std::{collections::VecDeque, sync::atomic::Ordering};

use common::{HeapPages, Rng, cpu0, payload, stored};
use oskit_ring_buffer::{
    Clock, Config, DataPage, Error, MapPage, Mode, PageAlloc, PageRead, RingBuffer,
    format::{COMMIT_MASK, RB_MISSED_EVENTS, RB_MISSED_STORED, SUBBUF_HEADER_SIZE},
    sim::ManualClock,
};

/// Writes `n` events of `len` bytes one tick apart; the first byte of each is its time.
fn fill<A: PageAlloc>(rb: &RingBuffer<A, &ManualClock>, n: usize, len: usize) {
    for _ in 0..n {
        let ts = rb.clock().advance(1);
        let mut data = vec![0xcd; len];
        data[0] = ts as u8;
        rb.write(cpu0(), &data).unwrap();
    }
}

/// The events of a page, parsed by the crate's Linux-format parser: `(ts, payload)`.
fn parse(page: &DataPage) -> Vec<(u64, Vec<u8>)> {
    let mut sb = page.subbuf().unwrap();
    std::iter::from_fn(|| sb.next_event().unwrap().map(|e| (e.ts, e.payload.to_vec()))).collect()
}

fn commit_of(page: &DataPage) -> u64 {
    u64::from_le_bytes(page.as_bytes()[8..16].try_into().unwrap())
}

fn timestamps(events: &[(u64, Vec<u8>)]) -> Vec<u64> {
    events.iter().map(|e| e.0).collect()
}

// 1000-byte payloads take 1008 bytes: four to a sub-buffer, 48 bytes of end padding.
const LEN: usize = 1000;

#[test]
fn a_whole_unread_subbuf_is_exchanged_not_copied() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(100);
    let rb = RingBuffer::new(Config::new(1, 4), &alloc, &clock).unwrap();
    fill(&rb, 6, LEN); // ts 101..=104 in the first sub-buffer, 105, 106 in the second
    let mut page = rb.alloc_read_page().unwrap();
    let spare = page.as_bytes().as_ptr();
    let got = rb.read_page(0, &mut page, false).unwrap().unwrap();
    assert_eq!(
        got,
        PageRead {
            len: 4 * 1008,
            events: 4,
            lost: 0,
            swapped: true
        }
    );
    assert_ne!(
        page.as_bytes().as_ptr(),
        spare,
        "zero copy: we own the sub-buffer now"
    );
    let events = parse(&page);
    assert_eq!(timestamps(&events), [101, 102, 103, 104]);
    assert!(events.iter().all(|e| e.1.len() == LEN));
    // Linux hands the page out with `commit` at the end of the last event (the end padding
    // dropped) and zeros after it.
    assert_eq!(commit_of(&page), 4 * 1008);
    assert_eq!(
        u64::from_le_bytes(page.as_bytes()[0..8].try_into().unwrap()),
        101
    );
    assert!(
        page.as_bytes()[SUBBUF_HEADER_SIZE + 4032..]
            .iter()
            .all(|b| *b == 0)
    );
    assert_eq!(rb.stats(0).unwrap().read, 4);

    // The writer is on the next sub-buffer: copied, and the page we hand in stays ours.
    let ours = page.as_bytes().as_ptr();
    let got = rb.read_page(0, &mut page, false).unwrap().unwrap();
    assert_eq!((got.swapped, got.events, got.len), (false, 2, 2 * 1008));
    assert_eq!(page.as_bytes().as_ptr(), ours);
    assert_eq!(timestamps(&parse(&page)), [105, 106]);
    assert!(
        page.as_bytes()[SUBBUF_HEADER_SIZE + 2016..]
            .iter()
            .all(|b| *b == 0)
    );
    assert_eq!(rb.read_page(0, &mut page, false), Ok(None), "empty");

    // The spare went into the ring: the buffer keeps working over it. The writer's sub-buffer
    // (now the reader's) takes two more, the three others twelve.
    fill(&rb, 14, LEN);
    let mut all = Vec::new();
    while let Some(r) = rb.read_page(0, &mut page, false).unwrap() {
        assert_eq!(r.lost, 0);
        all.extend(timestamps(&parse(&page)));
    }
    assert_eq!(all, (107..=120).collect::<Vec<_>>());
    let st = rb.stats(0).unwrap();
    assert_eq!(
        (st.entries, st.read, st.overrun, st.unread()),
        (20, 20, 0, 0)
    );
    rb.free_read_page(page);
    drop(rb);
    assert_eq!(alloc.outstanding.load(Ordering::Relaxed), 0, "leak");
}

#[test]
fn a_partly_read_subbuf_is_copied_from_where_the_reader_is() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(1000);
    let rb = RingBuffer::new(Config::new(1, 4), &alloc, &clock).unwrap();
    rb.write(cpu0(), b"first").unwrap();
    clock.advance(1 << 28); // a time extend before the next event
    rb.write(cpu0(), b"second").unwrap();
    clock.advance(3);
    rb.write(cpu0(), b"third").unwrap();
    fill(&rb, 5, LEN); // four fit, the fifth moves the writer to the next sub-buffer
    assert_eq!(
        rb.reader(0).unwrap().next_event().unwrap().payload,
        b"first\0\0\0"
    );
    let mut page = rb.alloc_read_page().unwrap();
    let spare = page.as_bytes().as_ptr();
    let got = rb.read_page(0, &mut page, false).unwrap().unwrap();
    assert!(!got.swapped, "partly read: copied");
    assert_eq!(page.as_bytes().as_ptr(), spare);
    let events = parse(&page);
    let t2 = 1000 + (1 << 28);
    assert_eq!(
        events[..2],
        [
            (t2, b"second\0\0".to_vec()),
            (t2 + 3, b"third\0\0\0".to_vec())
        ],
        "times rebuilt from the header (the last read time) and the copied time extend"
    );
    assert_eq!(
        u64::from_le_bytes(page.as_bytes()[0..8].try_into().unwrap()),
        1000,
        "header time = the time of the last event read"
    );
    assert_eq!(got.events, events.len() as u64);
    assert_eq!(got.events, 2 + 4, "second, third and four 1000-byte events");
    let st = rb.stats(0).unwrap();
    assert_eq!(st.read, 1 + got.events);
    rb.free_read_page(page);
}

#[test]
fn mapped_buffers_are_always_copied() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let rb = RingBuffer::new(Config::new(1, 3), &alloc, &clock).unwrap();
    fill(&rb, 6, LEN);
    rb.map(0).unwrap();
    let before: Vec<_> = (0..4)
        .map(|id| rb.map_page(0, MapPage::Subbuf { id, page: 0 }).unwrap())
        .collect();
    let mut page = rb.alloc_read_page().unwrap();
    let spare = page.as_bytes().as_ptr();
    let got = rb.read_page(0, &mut page, false).unwrap().unwrap();
    assert_eq!(
        (got.swapped, got.events),
        (false, 4),
        "whole, unread, but mapped"
    );
    assert_eq!(page.as_bytes().as_ptr(), spare);
    assert_eq!(timestamps(&parse(&page)), [1, 2, 3, 4]);
    // The copy has Linux's page shape too: commit without the end padding... of the copy.
    assert_eq!(commit_of(&page) & COMMIT_MASK, got.len as u64);
    let after: Vec<_> = (0..4)
        .map(|id| rb.map_page(0, MapPage::Subbuf { id, page: 0 }).unwrap())
        .collect();
    assert_eq!(before, after, "no sub-buffer left the mapping");
    rb.unmap(0).unwrap();
    // Unmapped again: the next whole sub-buffer... is the writer's (copied); write on.
    fill(&rb, 4, LEN);
    let got = rb.read_page(0, &mut page, false).unwrap().unwrap();
    assert!(got.swapped);
    assert_eq!(timestamps(&parse(&page)), [5, 6, 7, 8]);
    rb.free_read_page(page);
}

#[test]
fn lost_events_are_flagged_and_stored_as_linux_does() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let rb = RingBuffer::new(Config::new(1, 2), &alloc, &clock).unwrap();
    fill(&rb, 14, LEN); // 2 sub-buffers: the first 8 events are overwritten
    assert_eq!(rb.stats(0).unwrap().overrun, 8);
    let mut page = rb.alloc_read_page().unwrap();
    let got = rb.read_page(0, &mut page, false).unwrap().unwrap();
    assert_eq!(
        (got.swapped, got.lost, got.events, got.len),
        (true, 8, 4, 4032)
    );
    let commit = commit_of(&page);
    assert_eq!(commit, 4032 | RB_MISSED_EVENTS | RB_MISSED_STORED);
    let at = SUBBUF_HEADER_SIZE + 4032;
    assert_eq!(
        u64::from_le_bytes(page.as_bytes()[at..at + 8].try_into().unwrap()),
        8,
        "the lost count right after the data"
    );
    assert!(page.as_bytes()[at + 8..].iter().all(|b| *b == 0));
    let sb = page.subbuf().unwrap();
    assert_eq!(sb.missed_events(page.as_bytes()), Some(Some(8)));
    assert_eq!(timestamps(&parse(&page)), [9, 10, 11, 12]);
    // Only once.
    let got = rb.read_page(0, &mut page, false).unwrap().unwrap();
    assert_eq!((got.lost, got.swapped), (0, false));
    assert_eq!(commit_of(&page), 2 * 1008);
    assert_eq!(page.subbuf().unwrap().missed_events(page.as_bytes()), None);
    rb.free_read_page(page);
}

#[test]
fn a_full_page_has_no_room_for_the_count() {
    // 1012-byte payloads take 1020 bytes: four fill the 4080-byte data area exactly.
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let rb = RingBuffer::new(Config::new(1, 2), &alloc, &clock).unwrap();
    fill(&rb, 14, 1012);
    let mut page = rb.alloc_read_page().unwrap();
    let got = rb.read_page(0, &mut page, false).unwrap().unwrap();
    assert_eq!((got.len, got.lost), (4080, 8));
    assert_eq!(
        commit_of(&page),
        4080 | RB_MISSED_EVENTS,
        "flagged, not stored"
    );
    assert_eq!(
        page.subbuf().unwrap().missed_events(page.as_bytes()),
        Some(None)
    );
    // The same through the copy path (partly read first).
    fill(&rb, 8, 1012);
    let mut r = rb.reader(0).unwrap();
    // 15-16 filled the writer's sub-buffer, 17-20 the spare (now in the ring), 21 pushed the
    // head over 13-16.
    let ev = r.next_event().unwrap();
    assert_eq!((ev.ts, ev.lost), (17, 4));
    drop(r);
    let got = rb.read_page(0, &mut page, false).unwrap().unwrap();
    assert_eq!((got.swapped, got.lost, got.events), (false, 0, 3));
    rb.free_read_page(page);
}

#[test]
fn empty_full_and_wrong_size() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let mut rb = RingBuffer::new(Config::new(1, 3), &alloc, &clock).unwrap();
    let mut page = rb.alloc_read_page().unwrap();
    assert_eq!(rb.read_page(0, &mut page, false), Ok(None));
    assert_eq!(
        rb.read_page(1, &mut page, false),
        Err(Error::InvalidArgument)
    );
    fill(&rb, 2, 10);
    assert_eq!(
        rb.read_page(0, &mut page, true),
        Ok(None),
        "full: the writer is still on it"
    );
    assert_eq!(rb.stats(0).unwrap().read, 0, "nothing consumed");
    fill(&rb, 1, 4060); // does not fit after the two: the writer moves on
    let got = rb.read_page(0, &mut page, true).unwrap().unwrap();
    assert_eq!((got.swapped, got.events), (true, 2));
    rb.free_read_page(page);
    // A spare of the old size after a sub-buffer order change.
    let old = rb.alloc_read_page().unwrap();
    rb.set_subbuf_order(1).unwrap();
    let mut old = old;
    fill(&rb, 1, 10);
    assert_eq!(
        rb.read_page(0, &mut old, false),
        Err(Error::InvalidArgument)
    );
    rb.free_read_page(old);
    let mut page = rb.alloc_read_page().unwrap();
    assert_eq!(page.size(), 8192);
    assert_eq!(
        rb.read_page(0, &mut page, false).unwrap().unwrap().events,
        1
    );
    rb.free_read_page(page);
    drop(rb);
    assert_eq!(alloc.outstanding.load(Ordering::Relaxed), 0, "leak");
}

/// Random writes consumed by `read_page` (and sometimes `next_event`), mapped or not, against a
/// model: every event once, in order, intact; lost counts in the page where events vanished.
fn read_page_model(seed: u64, mode: Mode) {
    let mut rng = Rng::new(seed);
    let alloc = HeapPages::default();
    let clock = ManualClock::new(1 << 32);
    let rb = RingBuffer::new(
        Config::new(1, 2 + rng.below(3) as usize).mode(mode),
        &alloc,
        &clock,
    )
    .unwrap();
    let mut model: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    let mut page = rb.alloc_read_page().unwrap();
    let mut seq = 0u64;
    let (mut swaps, mut copies) = (0, 0);
    // (lost counts not delivered with an event yet, lost counts delivered): a page may hold
    // only discarded events, and its lost count then goes with the next event.
    let mut acc = (0u64, 0u64);
    let take = |model: &mut VecDeque<(u64, Vec<u8>)>,
                acc: &mut (u64, u64),
                ts: u64,
                data: &[u8],
                lost: u64| {
        let lost = lost + std::mem::take(&mut acc.0);
        acc.1 += lost;
        let pos = model
            .iter()
            .position(|e| e.0 == ts)
            .unwrap_or_else(|| panic!("seed {seed}: unknown event {ts}"));
        assert_eq!(pos as u64, lost, "seed {seed}: lost != skipped");
        model.drain(..pos);
        let (_, want) = model.pop_front().unwrap();
        assert_eq!(data, &stored(&want)[..], "seed {seed}: payload of {ts}");
    };
    let rounds = if cfg!(miri) { 40 } else { 600 };
    for _ in 0..rounds {
        match rng.below(10) {
            0..=5 => {
                for _ in 0..rng.below(12) {
                    let gap = if rng.chance(3) {
                        1 << 28
                    } else {
                        1 + rng.below(200)
                    };
                    clock.advance(gap);
                    let len = match rng.below(10) {
                        0 => rb.max_payload(),
                        1 => 0,
                        _ => rng.below(1500) as usize,
                    };
                    let data = payload(seq, len);
                    seq += 1;
                    match rb.write(cpu0(), &data) {
                        Ok(()) => model.push_back((clock.now(), data)),
                        Err(Error::Full) => assert_eq!(mode, Mode::ProducerConsumer),
                        Err(e) => panic!("seed {seed}: {e}"),
                    }
                }
            }
            6..=8 => {
                let mapped = rng.chance(30);
                if mapped {
                    rb.map(0).unwrap();
                }
                let full = rng.chance(20);
                if let Some(got) = rb.read_page(0, &mut page, full).unwrap() {
                    assert!(
                        !(mapped && got.swapped),
                        "seed {seed}: swapped while mapped"
                    );
                    if got.swapped {
                        swaps += 1;
                    } else {
                        copies += 1;
                    }
                    let commit = commit_of(&page);
                    assert_eq!(commit & COMMIT_MASK, got.len as u64);
                    let missed = page.subbuf().unwrap().missed_events(page.as_bytes());
                    match missed {
                        None => assert_eq!(got.lost, 0, "seed {seed}: lost but not flagged"),
                        Some(Some(n)) => assert_eq!(n, got.lost),
                        Some(None) => {
                            assert!(got.lost > 0);
                            assert!(got.len + 8 > rb.subbuf_size() - SUBBUF_HEADER_SIZE);
                        }
                    }
                    if mode == Mode::ProducerConsumer {
                        assert_eq!(got.lost, 0);
                    }
                    acc.0 += got.lost;
                    let events = parse(&page);
                    assert_eq!(events.len() as u64, got.events, "seed {seed}: event count");
                    for (ts, data) in events.iter() {
                        take(&mut model, &mut acc, *ts, data, 0);
                    }
                }
                if mapped {
                    rb.unmap(0).unwrap();
                }
            }
            _ => {
                let mut r = rb.reader(0).unwrap();
                for _ in 0..rng.below(5) {
                    let Some(ev) = r.next_event() else { break };
                    take(&mut model, &mut acc, ev.ts, ev.payload, ev.lost);
                }
            }
        }
        let st = rb.stats(0).unwrap();
        assert_eq!(
            model.len() as u64,
            st.unread() + st.overrun - acc.1,
            "seed {seed}: counters"
        );
    }
    while let Some(got) = rb.read_page(0, &mut page, false).unwrap() {
        acc.0 += got.lost;
        for (ts, data) in parse(&page).iter() {
            take(&mut model, &mut acc, *ts, data, 0);
        }
    }
    assert_eq!(rb.stats(0).unwrap().unread(), 0, "seed {seed}");
    if !cfg!(miri) {
        assert!(
            swaps > 0 && copies > 0,
            "seed {seed}: {swaps} swaps, {copies} copies"
        );
    }
    rb.free_read_page(page);
    drop(rb);
    assert_eq!(
        alloc.outstanding.load(Ordering::Relaxed),
        0,
        "seed {seed}: leak"
    );
}

#[test]
fn read_page_matches_model_overwrite() {
    for seed in 0..if cfg!(miri) { 1 } else { 30 } {
        read_page_model(seed, Mode::Overwrite);
    }
}

#[test]
fn read_page_matches_model_producer_consumer() {
    for seed in 200..if cfg!(miri) { 201 } else { 230 } {
        read_page_model(seed, Mode::ProducerConsumer);
    }
}

#[test]
fn a_page_of_discarded_events_still_carries_the_lost_count() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let rb = RingBuffer::new(Config::new(1, 2), &alloc, &clock).unwrap();
    fill(&rb, 4, LEN); // sub-buffer A: four events
    for _ in 0..4 {
        // sub-buffer B: four discarded reservations
        clock.advance(1);
        drop(rb.reserve(cpu0(), LEN).unwrap());
    }
    fill(&rb, 1, LEN); // back on A: the head is pushed, A's four events are lost
    assert_eq!(rb.stats(0).unwrap().overrun, 4);
    let mut page = rb.alloc_read_page().unwrap();
    let got = rb.read_page(0, &mut page, false).unwrap().unwrap();
    assert_eq!((got.events, got.lost, got.swapped), (0, 4, true));
    assert_eq!(
        page.subbuf().unwrap().missed_events(page.as_bytes()),
        Some(Some(4))
    );
    // As on Linux, the count was handed over with that page, not again with the next event.
    let got = rb.read_page(0, &mut page, false).unwrap().unwrap();
    assert_eq!((got.events, got.lost), (1, 0));
    assert_eq!(timestamps(&parse(&page)), [9]);
    rb.free_read_page(page);
}

#[test]
fn read_page_races_a_writer_thread() {
    // Threads: the writer fills sub-buffers while pages are exchanged or copied under it.
    let alloc = HeapPages::default();
    let clock = oskit_ring_buffer::sim::CountingClock::new(1);
    let rb = RingBuffer::new(
        Config::new(1, 4).mode(Mode::ProducerConsumer),
        &alloc,
        &clock,
    )
    .unwrap();
    let n = if cfg!(miri) { 60u32 } else { 20_000 };
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut page = rb.alloc_read_page().unwrap();
    let mut next = 0u32;
    let (mut swaps, mut copies) = (0u32, 0u32);
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..n {
                let mut data = [0u8; 200];
                data[..4].copy_from_slice(&i.to_le_bytes());
                // Producer/consumer: retry until the reader made room.
                while rb.write(cpu0(), &data) == Err(Error::Full) {
                    std::thread::yield_now();
                }
            }
            done.store(true, Ordering::Release);
        });
        loop {
            let finished = done.load(Ordering::Acquire);
            match rb.read_page(0, &mut page, false).unwrap() {
                Some(got) => {
                    if got.swapped {
                        swaps += 1;
                    } else {
                        copies += 1;
                    }
                    for (_, data) in parse(&page) {
                        let i = u32::from_le_bytes(data[..4].try_into().unwrap());
                        assert_eq!(i, next, "reordered, duplicated or lost");
                        assert!(data[4..].iter().all(|b| *b == 0), "corrupted");
                        next += 1;
                    }
                }
                None if finished => break,
                None => std::thread::yield_now(),
            }
        }
    });
    assert_eq!(next, n);
    if !cfg!(miri) {
        assert!(swaps > 0, "{swaps} exchanges, {copies} copies");
    }
    assert_eq!(rb.stats(0).unwrap().unread(), 0);
    rb.free_read_page(page);
}
