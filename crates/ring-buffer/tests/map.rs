//! Mapping: IDs, meta page, map counting, `map_get_reader`, the layout, and consuming through
//! `MappedReader` against a model.

mod common;

use std::collections::VecDeque;

use common::{HeapPages, Rng, cpu0, payload, stored};
use oskit_ring_buffer::{
    Clock, Config, Error, MapLayout, MapPage, MapRegion, MappedReader, Mode, RawRegion, RingBuffer,
    format::{
        COMMIT_MASK, RB_MISSED_EVENTS, RB_MISSED_STORED, SUBBUF_HEADER_SIZE, Subbuf,
        TraceBufferMeta,
    },
    sim::ManualClock,
};
use zerocopy::FromBytes;

fn meta_of(view: &impl MapRegion) -> TraceBufferMeta {
    let mut raw = [0u8; 80];
    view.read(0, &mut raw).unwrap();
    TraceBufferMeta::read_from_bytes(&raw).unwrap()
}

#[test]
fn map_counts_and_unmap_tears_down() {
    let alloc = HeapPages::default();
    let rb = RingBuffer::new(Config::new(2, 4), &alloc, ManualClock::new(0)).unwrap();
    let before = alloc.outstanding.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(rb.unmap(0), Err(Error::NotMapped));
    assert_eq!(rb.map_get_reader(0), Err(Error::NotMapped));
    assert_eq!(rb.map(2), Err(Error::InvalidArgument));
    rb.map(0).unwrap();
    let after_map = alloc.outstanding.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(after_map, before + 1, "first map allocates the meta page");
    rb.map(0).unwrap();
    assert_eq!(rb.map_count(0), Ok(2));
    assert_eq!(
        alloc.outstanding.load(std::sync::atomic::Ordering::Relaxed),
        after_map
    );
    rb.unmap(0).unwrap();
    assert!(
        rb.map_page(0, MapPage::Meta).unwrap().is_some(),
        "still mapped once"
    );
    rb.unmap(0).unwrap();
    assert_eq!(
        alloc.outstanding.load(std::sync::atomic::Ordering::Relaxed),
        before
    );
    assert_eq!(rb.unmap(0), Err(Error::NotMapped));
    assert_eq!(rb.map_page(0, MapPage::Meta), Err(Error::NotMapped));
    assert_eq!(rb.map_count(1), Ok(0));
    drop(rb);
    assert_eq!(
        alloc.outstanding.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "leak"
    );
}

#[test]
fn meta_page_and_ids_follow_linux() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(10);
    let rb = RingBuffer::new(Config::new(1, 3).subbuf_order(1), &alloc, &clock).unwrap();
    // Fill the head sub-buffer and part of the next.
    for i in 0..100u64 {
        clock.advance(1);
        rb.write(cpu0(), &payload(i, 100)).unwrap();
    }
    rb.map(0).unwrap();
    let view = rb.mapped_view(0).unwrap();
    let meta = meta_of(&view);
    assert_eq!(meta.meta_page_size, 8192);
    assert_eq!(meta.meta_struct_len, 80);
    assert_eq!(meta.subbuf_size, 8192);
    assert_eq!(meta.nr_subbufs, 4);
    assert_eq!(meta.reader.id, 0, "the reader sub-buffer is ID 0");
    assert_eq!(meta.reader.read, 0);
    assert_eq!((meta.entries, meta.overrun, meta.read), (100, 0, 0));
    assert_eq!(view.len(), 5 * 8192);
    // The zero page after the meta page reads as zeros.
    let mut pad = [1u8; 16];
    view.read(4096, &mut pad).unwrap();
    assert_eq!(pad, [0; 16]);

    // The head gets ID 1: the first get_reader swaps it in.
    rb.map_get_reader(0).unwrap();
    let meta = meta_of(&view);
    assert_eq!(meta.reader.id, 1, "IDs go from the head around the ring");
    let events_on_first = meta.read;
    assert!(events_on_first > 0 && events_on_first < 100);
    assert_eq!(
        meta.reader.read as usize,
        {
            let mut h = [0u8; 8];
            view.read(8192 * 2 + 8, &mut h).unwrap();
            u64::from_le_bytes(h) as usize
        },
        "reader.read = the whole committed sub-buffer once accounted as read"
    );
    rb.map_get_reader(0).unwrap();
    let meta = meta_of(&view);
    assert_eq!(meta.reader.id, 2);
    assert_eq!(meta.read, 100);
    // Nothing left: the reader stays.
    rb.map_get_reader(0).unwrap();
    assert_eq!(meta_of(&view).reader.id, 2);
    // The ID -> page translation matches the kernel addresses.
    let p = rb
        .map_page(0, MapPage::Subbuf { id: 2, page: 1 })
        .unwrap()
        .unwrap();
    let q = rb
        .map_page(0, MapPage::Subbuf { id: 2, page: 0 })
        .unwrap()
        .unwrap();
    assert_eq!(p.as_ptr() as usize - q.as_ptr() as usize, 4096);
    assert_eq!(
        rb.map_page(0, MapPage::Subbuf { id: 4, page: 0 }),
        Err(Error::InvalidArgument)
    );
}

#[test]
fn map_layout_is_linux_rb_map_vma() {
    let l = MapLayout::new(0, 3);
    assert_eq!(l.total_pages(), 4);
    let all: Vec<_> = l.pages(0, 4).unwrap().collect();
    assert_eq!(
        all,
        [
            MapPage::Meta,
            MapPage::Subbuf { id: 0, page: 0 },
            MapPage::Subbuf { id: 1, page: 0 },
            MapPage::Subbuf { id: 2, page: 0 }
        ]
    );
    assert_eq!(
        l.pages(3, 1).unwrap().collect::<Vec<_>>(),
        [MapPage::Subbuf { id: 2, page: 0 }]
    );
    assert_eq!(l.pages(0, 0).err(), Some(Error::InvalidArgument), "empty");
    assert_eq!(
        l.pages(0, 5).err(),
        Some(Error::InvalidArgument),
        "too long"
    );
    assert_eq!(
        l.pages(2, 3).err(),
        Some(Error::InvalidArgument),
        "too long from offset"
    );
    assert_eq!(
        l.pages(9, 1).err(),
        Some(Error::InvalidArgument),
        "past the end"
    );

    let l = MapLayout::new(2, 2);
    assert_eq!(l.total_pages(), 12);
    let all: Vec<_> = l.pages(0, 12).unwrap().collect();
    assert_eq!(all[0], MapPage::Meta);
    assert!(all[1..4].iter().all(|p| *p == MapPage::Zero));
    assert_eq!(all[4], MapPage::Subbuf { id: 0, page: 0 });
    assert_eq!(all[11], MapPage::Subbuf { id: 1, page: 3 });
    assert_eq!(
        l.pages(2, 1).err(),
        Some(Error::InvalidArgument),
        "misaligned"
    );
    assert_eq!(
        l.pages(8, 2).unwrap().collect::<Vec<_>>(),
        [
            MapPage::Subbuf { id: 1, page: 0 },
            MapPage::Subbuf { id: 1, page: 1 }
        ]
    );
}

/// Random writes interleaved with consumption through the mapping; every event, lost count and
/// the sub-buffers' missed-events flags are checked against the model.
fn mapped_model(seed: u64, mode: Mode) {
    let mut rng = Rng::new(seed);
    let alloc = HeapPages::default();
    let clock = ManualClock::new(1 << 20);
    let rb = RingBuffer::new(Config::new(1, 3).mode(mode), &alloc, &clock).unwrap();
    rb.map(0).unwrap();
    let view = rb.mapped_view(0).unwrap();
    let mut reader = MappedReader::new(&view, || rb.map_get_reader(0)).unwrap();
    let mut model = VecDeque::new();
    let mut buf = vec![0u8; 4096];
    let mut page = vec![0u8; 4096];
    let mut seq = 0u64;
    let rounds = if cfg!(miri) { 20 } else { 300 };
    for round in 0..rounds {
        for _ in 0..rng.below(60) {
            let big = rng.chance(5);
            clock.advance(1 + rng.below(if big { 1 << 34 } else { 500 }));
            let long = rng.chance(10);
            let len = rng.below(if long { 4000 } else { 64 }) as usize;
            let data = payload(seq, len);
            seq += 1;
            match rb.write(cpu0(), &data) {
                Ok(()) => model.push_back((clock.now(), data)),
                Err(Error::Full) => assert_eq!(mode, Mode::ProducerConsumer),
                Err(e) => panic!("{e}"),
            }
        }
        let final_round = round == rounds - 1;
        loop {
            let fresh = reader.get_reader().unwrap();
            if fresh {
                // The sub-buffer as a Linux parser sees it.
                let n = reader.copy_subbuf(&mut page).unwrap();
                let sb = Subbuf::new(&page[..n]).unwrap();
                let missed = sb.missed_events(&page[..n]);
                let meta_lost = reader.meta().reader.lost_events;
                // Linux 6.10: the count is in the sub-buffer (and the bytes after it zeroed),
                // the meta page's `lost_events` stays 0; only a count the sub-buffer cannot
                // carry goes to the meta page (checked exact through `ev.lost` below).
                match missed {
                    None => {}
                    Some(Some(stored)) => {
                        assert!(stored > 0);
                        assert_eq!(meta_lost, 0, "seed {seed}: counted twice");
                        let end =
                            SUBBUF_HEADER_SIZE + (sb.header().commit & COMMIT_MASK) as usize + 8;
                        assert!(
                            page[end..n].iter().all(|&b| b == 0),
                            "seed {seed}: stale bytes"
                        );
                    }
                    Some(None) => assert!(meta_lost > 0),
                }
                if mode == Mode::ProducerConsumer {
                    assert_eq!(
                        sb.header().commit & (RB_MISSED_EVENTS | RB_MISSED_STORED),
                        0
                    );
                }
            }
            let mut got = 0;
            while let Some(ev) = reader.next_in_subbuf(&mut buf).unwrap() {
                got += 1;
                let pos = model.iter().position(|(ts, _)| *ts == ev.ts).unwrap();
                assert_eq!(pos as u64, ev.lost, "seed {seed}: lost != skipped");
                model.drain(..pos);
                let (_, data) = model.pop_front().unwrap();
                assert_eq!(&buf[..ev.len], &stored(&data)[..], "seed {seed}: payload");
            }
            if std::env::var("DBG").is_ok() {
                eprintln!(
                    "round {round} fresh {fresh} id {:?} got {got} model {} meta {:?}",
                    reader.reader_id(),
                    model.len(),
                    reader.meta()
                );
            }
            if !fresh && got == 0 || !final_round && rng.chance(50) {
                break;
            }
        }
        let meta = reader.meta();
        assert!(meta.entries >= meta.overrun + meta.read);
    }
    assert!(
        model.is_empty(),
        "seed {seed}: {} events never read",
        model.len()
    );
    let st = rb.stats(0).unwrap();
    assert_eq!(st.unread(), 0);
    let meta = reader.meta();
    assert_eq!(meta.entries - meta.overrun - meta.read, 0);
}

#[test]
fn mapped_consumption_matches_model_overwrite() {
    for seed in 0..if cfg!(miri) { 1 } else { 20 } {
        mapped_model(seed, Mode::Overwrite);
    }
}

#[test]
fn mapped_consumption_matches_model_producer_consumer() {
    for seed in 50..if cfg!(miri) { 51 } else { 70 } {
        mapped_model(seed, Mode::ProducerConsumer);
    }
}

/// A Linux 6.10 reader sub-buffer as the kernel hands it out: losses in the commit flags, the
/// meta page's `lost_events` 0. With room, the count is stored after the events and becomes
/// the first event's `lost`; on a full sub-buffer only the flag says events were lost.
#[test]
fn mapped_reader_takes_losses_from_the_commit_flags() {
    use oskit_ring_buffer::format::{self, PAGE_SIZE};
    // A mapping: meta page, then sub-buffers 0 and 1; sub-buffer 1 is the reader.
    let mapping = |commit: u64, stored: Option<u64>| {
        let mut m = vec![0u8; 3 * PAGE_SIZE];
        let meta = TraceBufferMeta {
            meta_page_size: PAGE_SIZE as u32,
            meta_struct_len: 80,
            subbuf_size: PAGE_SIZE as u32,
            nr_subbufs: 2,
            reader: oskit_ring_buffer::format::ReaderMeta {
                lost_events: 0,
                id: 1,
                read: 0,
            },
            ..TraceBufferMeta::default()
        };
        m[..80].copy_from_slice(zerocopy::IntoBytes::as_bytes(&meta));
        let sb = 2 * PAGE_SIZE;
        m[sb..sb + 8].copy_from_slice(&500u64.to_le_bytes());
        m[sb + 8..sb + 16].copy_from_slice(&commit.to_le_bytes());
        // One 4-byte event "abcd", delta 7.
        m[sb + 16..sb + 20].copy_from_slice(&format::header(1, 7).to_le_bytes());
        m[sb + 20..sb + 24].copy_from_slice(b"abcd");
        if let Some(n) = stored {
            m[sb + 24..sb + 32].copy_from_slice(&n.to_le_bytes());
        }
        m
    };
    let first = |m: &[u8]| {
        let mut r = MappedReader::new(m, || Ok(())).unwrap();
        let mut buf = [0u8; 64];
        let ev = r.next_in_subbuf(&mut buf).unwrap().unwrap();
        assert_eq!((ev.ts, &buf[..ev.len]), (507, &b"abcd"[..]));
        (ev.lost, ev.missed)
    };
    let stored = mapping(8 | RB_MISSED_EVENTS | RB_MISSED_STORED, Some(4761));
    assert_eq!(first(&stored), (4761, true));
    let flag_only = mapping(8 | RB_MISSED_EVENTS, None);
    assert_eq!(first(&flag_only), (0, true));
    let none = mapping(8, None);
    assert_eq!(first(&none), (0, false));
    // A stored count that would lie past the sub-buffer is corrupt, not read out of bounds.
    let past = mapping(
        (PAGE_SIZE as u64 - 16 - 4) | RB_MISSED_EVENTS | RB_MISSED_STORED,
        None,
    );
    assert!(matches!(
        MappedReader::new(&past[..], || Ok(())).err(),
        Some(Error::Corrupt)
    ));
}

/// The kernel updates a reader sub-buffer's commit word while user space reads it (the reader
/// sub-buffer can be the writer's commit page): a `RawRegion` read of an aligned 8-byte word
/// must see one store or the other, never a mix (a torn commit once made the live-kernel test
/// decode past the committed data: `Corrupt`).
#[test]
#[cfg_attr(
    miri,
    ignore = "a store racing the reader is the point; Miri would rule the volatile read a data race"
)]
fn raw_region_reads_an_aligned_word_whole() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const A: u64 = 0x0101_0101_0101_0101;
    const B: u64 = 0xfefe_fefe_fefe_fefe;
    let words: &'static [AtomicU64; 4] = Box::leak(Box::new([const { AtomicU64::new(A) }; 4]));
    let stop: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let writer = std::thread::spawn(move || {
        let mut flip = false;
        while !stop.load(Ordering::Relaxed) {
            flip = !flip;
            words[1].store(if flip { B } else { A }, Ordering::Release);
        }
    });
    // SAFETY: the words are leaked (live for the rest of the test), 32 readable bytes.
    let region = unsafe { RawRegion::new(words.as_ptr().cast(), 32) };
    // Two million reads, and until the reads have seen the word change a thousand times
    // (the writer ran meanwhile), for ten seconds at most.
    let (mut torn, mut reads, mut changes, mut last) = (0, 0u64, 0u64, A);
    let start = std::time::Instant::now();
    while (reads < 2_000_000 || changes < 1000) && start.elapsed().as_secs() < 10 {
        let mut b = [0u8; 8];
        region.read(8, &mut b).unwrap();
        let v = u64::from_le_bytes(b);
        match v {
            A | B => {
                changes += u64::from(v != last);
                last = v;
            }
            _ => torn += 1,
        }
        reads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(torn, 0, "reads that mixed two stores, of {reads}");
    assert!(
        changes >= 1000,
        "the writer hardly ran: {changes} changes seen"
    );
}
