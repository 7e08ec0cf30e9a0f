//! Harnesses of `oskit-ring-buffer`.

use std::{
    alloc::{Layout, alloc_zeroed, dealloc},
    collections::VecDeque,
    ptr::NonNull,
};

use oskit_ring_buffer::{
    Clock, Config, DataPage, Error, LocalCpu, MappedReader, Mode, PageAlloc, RingBuffer,
    format::{COMMIT_MASK, PAGE_SIZE, SUBBUF_HEADER_SIZE, Subbuf},
    sim::{FailingAlloc, ManualClock},
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
        let layout = Layout::from_size_align(PAGE_SIZE << order, PAGE_SIZE).unwrap();
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(pages.as_ptr(), layout) }
    }
}

fn stored(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(data.len().max(1).div_ceil(4) * 4, 0);
    v
}

/// Arbitrary operation sequences (writes of any size, nested reservations, discards, reads,
/// peeks, mapped reads, resets, mode switches, resizes, sub-buffer order changes, page reads,
/// allocation failures) against a model queue of `(ts, payload)`: nothing is duplicated,
/// reordered, corrupted, or lost without being counted.
pub fn ops(data: &[u8]) {
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next();
    let Some(cfg) = next() else { return };
    let mode = if cfg & 1 == 0 {
        Mode::Overwrite
    } else {
        Mode::ProducerConsumer
    };
    let subbufs = 2 + usize::from((cfg >> 1) & 3);
    let clock = ManualClock::new(1 << 40);
    let mut rb = RingBuffer::new(
        Config::new(1, subbufs).mode(mode),
        FailingAlloc::new(Heap),
        &clock,
    )
    .unwrap();
    // SAFETY: this thread is the only writer of CPU 0.
    let cpu = unsafe { LocalCpu::new(0) };
    let mut spare: Option<DataPage> = None;
    let mut model: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    let mut mode_now = mode;
    let mut seq = 0u8;
    // Lost counts delivered with events; the rest of `overrun` is still pending at the end.
    let lost_seen = std::cell::Cell::new(0u64);

    // Lost counts `read_page` delivered with a page that held no event (only discarded ones):
    // they were before the next event.
    let pending_lost = std::cell::Cell::new(0u64);

    let check =
        |model: &mut VecDeque<(u64, Vec<u8>)>, ts: u64, payload: &[u8], lost: u64, mode: Mode| {
            let lost = lost + pending_lost.take();
            lost_seen.set(lost_seen.get() + lost);
            let pos = model
                .iter()
                .position(|(t, _)| *t == ts)
                .expect("event not in model");
            if mode == Mode::Overwrite {
                assert_eq!(pos as u64, lost, "lost count != skipped events");
            }
            model.drain(..pos);
            let (_, want) = model.pop_front().unwrap();
            assert_eq!(payload, &stored(&want)[..], "payload corrupted");
        };

    while let Some(op) = next() {
        let arg = next().unwrap_or(0);
        match op % 8 {
            0..=2 => {
                let gap = match arg >> 6 {
                    0 => 1,
                    1 => 1 << 27,
                    2 => 1 << 33,
                    _ => u64::from(arg),
                };
                clock.advance(gap);
                let max = rb.max_payload();
                let len = match op >> 3 {
                    0 => 0,
                    1 => max,
                    2 => max + 1,
                    3 => 112,
                    4 => 113,
                    _ => usize::from(arg) * 16 % (max + 2),
                };
                let payload = vec![seq; len];
                seq = seq.wrapping_add(1);
                match rb.write(cpu, &payload) {
                    Ok(()) => model.push_back((clock.now(), payload)),
                    Err(Error::EventTooLarge) => assert!(len > max),
                    Err(Error::Full) => assert_eq!(mode_now, Mode::ProducerConsumer),
                    Err(e) => panic!("write: {e}"),
                }
            }
            3 => {
                // Nested: outer reservation, `arg % 5` inner writes, then commit or discard.
                clock.advance(1);
                let len = usize::from(arg) * 7;
                let Ok(mut outer) = rb.reserve(cpu, len) else {
                    continue;
                };
                outer.payload_mut().fill(seq);
                let slot = model.len();
                model.push_back((clock.now(), vec![seq; len]));
                seq = seq.wrapping_add(1);
                for i in 0..arg % 5 {
                    clock.advance(1);
                    let p = vec![seq; usize::from(i) * 300];
                    seq = seq.wrapping_add(1);
                    if rb.write(cpu, &p).is_ok() {
                        model.push_back((clock.now(), p));
                    }
                }
                if arg & 0x80 != 0 {
                    drop(outer);
                    model.remove(slot);
                } else {
                    outer.commit();
                }
            }
            4 => {
                let mut r = rb.reader(0).unwrap();
                for _ in 0..arg % 32 {
                    let Some(e) = r.next_event() else { break };
                    check(&mut model, e.ts, e.payload, e.lost, mode_now);
                }
            }
            5 => {
                let mut r = rb.reader(0).unwrap();
                let a = r.peek().map(|e| (e.ts, e.payload.to_vec(), e.lost));
                let b = r.next_event().map(|e| (e.ts, e.payload.to_vec(), e.lost));
                assert_eq!(a, b, "peek != next");
                if let Some((ts, p, lost)) = b {
                    check(&mut model, ts, &p, lost, mode_now);
                }
            }
            6 => {
                // Consume through the mapping; each sub-buffer also parses as Linux's format.
                rb.map(0).unwrap();
                {
                    let view = rb.mapped_view(0).unwrap();
                    let mut reader = MappedReader::new(&view, || rb.map_get_reader(0)).unwrap();
                    let mut buf = vec![0u8; rb.subbuf_size()];
                    let mut page = vec![0u8; rb.subbuf_size()];
                    for _ in 0..arg % 8 {
                        if !reader.get_reader().unwrap() {
                            // Same sub-buffer: continue where we were.
                        }
                        let n = reader.copy_subbuf(&mut page).unwrap();
                        let mut sb = Subbuf::new(&page[..n]).expect("own sub-buffer parses");
                        while sb.next_event().expect("own sub-buffer decodes").is_some() {}
                        while let Some(e) = reader.next_in_subbuf(&mut buf).unwrap() {
                            let len = e.len;
                            check(&mut model, e.ts, &buf[..len], e.lost, mode_now);
                        }
                    }
                }
                rb.unmap(0).unwrap();
            }
            _ => match arg % 8 {
                0 => {
                    rb.reset(cpu).unwrap();
                    model.clear();
                    lost_seen.set(0);
                    pending_lost.set(0);
                }
                1 => {
                    mode_now = if mode_now == Mode::Overwrite {
                        Mode::ProducerConsumer
                    } else {
                        Mode::Overwrite
                    };
                    rb.set_mode(mode_now);
                }
                2 | 3 => {
                    // Resize (2..=9 sub-buffers) or change the order (0..=2), maybe running
                    // out of memory part-way: then nothing may change.
                    let before = (rb.stats(0).unwrap(), rb.nr_subbufs(0), rb.subbuf_size());
                    let fail = arg & 0x80 != 0;
                    if fail {
                        rb.allocator().fail_after(u64::from(arg >> 5 & 3));
                    }
                    let order_change = arg % 8 == 3;
                    let res = if order_change {
                        rb.set_subbuf_order(u32::from(arg >> 3) % 3)
                    } else {
                        rb.resize(2 + usize::from(arg >> 3) % 8)
                    };
                    rb.allocator().heal();
                    let after = (rb.stats(0).unwrap(), rb.nr_subbufs(0), rb.subbuf_size());
                    match res {
                        Ok(()) if order_change && after.2 != before.2 => {
                            model.clear();
                            lost_seen.set(0);
                            pending_lost.set(0);
                            assert_eq!(after.0, Default::default(), "order change keeps counts");
                            if let Some(p) = spare.take() {
                                rb.free_read_page(p);
                            }
                        }
                        Ok(()) => {
                            let (b, a) = (before.0, after.0);
                            assert_eq!((a.entries, a.read), (b.entries, b.read));
                            assert!(a.overrun >= b.overrun);
                        }
                        Err(Error::NoMemory) => {
                            assert!(fail);
                            assert_eq!(before, after, "NoMemory changed the buffer");
                        }
                        Err(e) => panic!("geometry change: {e}"),
                    }
                }
                4 | 5 => {
                    // Consume a page (exchanged or copied) and parse it as Linux would.
                    let mapped = arg & 0x40 != 0;
                    if mapped {
                        rb.map(0).unwrap();
                    }
                    let page = match spare.as_mut() {
                        Some(p) => p,
                        None => spare.insert(rb.alloc_read_page().unwrap()),
                    };
                    if let Some(got) = rb.read_page(0, page, arg % 8 == 5).unwrap() {
                        assert!(!(mapped && got.swapped), "exchanged a mapped sub-buffer");
                        let bytes = page.as_bytes();
                        let commit = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
                        assert_eq!(commit & COMMIT_MASK, got.len as u64);
                        let mut sb = page.subbuf().expect("own page parses");
                        match sb.missed_events(bytes) {
                            None => assert_eq!(got.lost, 0),
                            Some(Some(n)) => assert_eq!(n, got.lost),
                            Some(None) => {
                                assert!(got.len + 8 > bytes.len() - SUBBUF_HEADER_SIZE)
                            }
                        }
                        pending_lost.set(pending_lost.get() + got.lost);
                        let mut n = 0;
                        while let Some(e) = sb.next_event().expect("own page decodes") {
                            check(&mut model, e.ts, e.payload, 0, mode_now);
                            n += 1;
                        }
                        assert_eq!(n, got.events);
                    }
                    if mapped {
                        assert_eq!(rb.resize(3), Err(Error::Busy));
                        assert_eq!(rb.set_subbuf_order(3), Err(Error::Busy));
                        rb.unmap(0).unwrap();
                    }
                }
                _ => {
                    let st = rb.stats(0).unwrap();
                    assert!(st.entries >= st.overrun + st.read);
                }
            },
        }
    }
    // Drain: everything left is in the model, in order.
    let mut r = rb.reader(0).unwrap();
    while let Some(e) = r.next_event() {
        check(&mut model, e.ts, e.payload, e.lost, mode_now);
    }
    drop(r);
    // What is left in the model was overwritten after the last event delivered: exactly the
    // overrun no event has reported yet.
    let st = rb.stats(0).unwrap();
    assert_eq!(
        model.len() as u64,
        st.overrun - lost_seen.get(),
        "events vanished without being counted"
    );
    assert_eq!(rb.stats(0).unwrap().unread(), 0);
    if let Some(p) = spare {
        rb.free_read_page(p);
    }
}

/// Arbitrary bytes as a mapping (meta page + sub-buffers) and as sub-buffers: the user-space
/// reader and the page parser report errors, never panic or read out of bounds.
pub fn mapped_reader(data: &[u8]) {
    let mut region = data.to_vec();
    // Make the meta page plausible often enough to get past validation.
    if region.len() >= 80 && region[0] & 1 == 1 {
        let sb = (PAGE_SIZE as u32).to_le_bytes();
        region[0..4].copy_from_slice(&sb);
        region[4..8].copy_from_slice(&80u32.to_le_bytes());
        region[8..12].copy_from_slice(&sb);
        let n = ((region.len() / PAGE_SIZE).saturating_sub(1)).max(2) as u32;
        region[12..16].copy_from_slice(&n.to_le_bytes());
        region[20] %= 4;
        region[21..24].fill(0);
        region.resize(region.len().max(PAGE_SIZE * (n as usize + 1)), 0);
        // Spread the input over the sub-buffers.
        for (i, b) in data.iter().enumerate().skip(80) {
            let at = PAGE_SIZE + (i * 131) % (region.len() - PAGE_SIZE);
            region[at] = *b;
        }
    }
    let mut calls = 0u32;
    let flip = data.first().copied().unwrap_or(0);
    let get = || {
        calls += 1;
        if flip & 2 != 0 && calls.is_multiple_of(3) {
            Err(Error::Os(4))
        } else {
            Ok(())
        }
    };
    if let Ok(mut r) = MappedReader::new(&region[..], get) {
        let mut buf = vec![0u8; r.subbuf_size()];
        for _ in 0..64 {
            if let Ok(Some(e)) = r.next_event(&mut buf) {
                assert!(e.len <= buf.len());
            }
        }
        let mut page = vec![0u8; r.subbuf_size()];
        let _ = r.copy_subbuf(&mut page);
    }
    for chunk in data.chunks(PAGE_SIZE.min(data.len().max(1))) {
        if let Ok(mut sb) = Subbuf::new(chunk) {
            let _ = sb.missed_events(chunk);
            for _ in 0..2048 {
                match sb.next_event() {
                    Ok(Some(e)) => assert!(e.payload.len() % 4 == 0),
                    _ => break,
                }
            }
        }
    }
}
