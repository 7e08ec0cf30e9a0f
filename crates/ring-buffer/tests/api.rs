//! The writer/reader API: exact bytes of the format, nesting, discard, disable, reset, waiter,
//! geometry limits, memory accounting.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::{HeapPages, cpu0};
use oskit_ring_buffer::{
    Config, Error, MapRegion, Mode, RingBuffer, Waiter,
    format::{self, Subbuf},
    sim::{ManualClock, PagePool},
};

/// The first data sub-buffer (ID 1, the head at map time) as user space sees it.
fn head_subbuf<A: oskit_ring_buffer::PageAlloc, C: oskit_ring_buffer::Clock>(
    rb: &RingBuffer<A, C>,
) -> Vec<u8> {
    rb.map(0).unwrap();
    let view = rb.mapped_view(0).unwrap();
    let mut page = vec![0u8; rb.subbuf_size()];
    view.read(2 * rb.subbuf_size(), &mut page).unwrap();
    rb.unmap(0).unwrap();
    page
}

fn word(page: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(page[off..off + 4].try_into().unwrap())
}

#[test]
fn bytes_are_linux_format() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(1000);
    let rb = RingBuffer::new(Config::new(1, 2), &alloc, &clock).unwrap();
    rb.write(cpu0(), &[]).unwrap(); // ts 1000, first on the page
    clock.advance(3);
    rb.write(cpu0(), &[1, 2, 3, 4, 5]).unwrap();
    clock.advance(7);
    rb.write(cpu0(), &[0xab; 113]).unwrap();
    clock.advance(1 << 27); // does not fit 27 bits: time extend
    rb.write(cpu0(), &[9]).unwrap();

    let p = head_subbuf(&rb);
    assert_eq!(
        u64::from_le_bytes(p[0..8].try_into().unwrap()),
        1000,
        "time_stamp"
    );
    assert_eq!(
        u64::from_le_bytes(p[8..16].try_into().unwrap()),
        8 + 12 + 124 + 16,
        "commit"
    );
    let d = 16;
    // type_len 1, delta 0, 4 zero bytes for an empty payload.
    assert_eq!(word(&p, d), 1);
    assert_eq!(word(&p, d + 4), 0);
    // type_len 2 (8 bytes), delta 3.
    assert_eq!(word(&p, d + 8), (3 << 5) | 2);
    assert_eq!(&p[d + 12..d + 20], &[1, 2, 3, 4, 5, 0, 0, 0]);
    // 113 bytes > 112: type_len 0, array[0] = 4 + 116.
    assert_eq!(word(&p, d + 20), 7 << 5);
    assert_eq!(word(&p, d + 24), 120);
    assert!(p[d + 28..d + 28 + 113].iter().all(|b| *b == 0xab));
    assert_eq!(&p[d + 141..d + 144], &[0, 0, 0]);
    // Time extend (type 30): delta 2^27 = low 27 bits 0, array[0] = 1; then delta 0.
    assert_eq!(word(&p, d + 144), 30);
    assert_eq!(word(&p, d + 148), 1);
    assert_eq!(word(&p, d + 152), 1);
    assert_eq!(&p[d + 156..d + 160], &[9, 0, 0, 0]);

    // And our own parser agrees on the times.
    let mut sb = Subbuf::new(&p).unwrap();
    let ts: Vec<u64> = std::iter::from_fn(|| sb.next_event().unwrap().map(|e| e.ts)).collect();
    assert_eq!(ts, [1000, 1003, 1010, 1010 + (1 << 27)]);
}

#[test]
fn full_page_ends_with_linux_padding() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(5);
    let rb = RingBuffer::new(Config::new(1, 3), &alloc, &clock).unwrap();
    // 4080 data bytes: 40 events of 100 bytes (104 each) = 4160 > 4080, so 39 fit (4056).
    for _ in 0..40 {
        rb.write(cpu0(), &[7; 100]).unwrap();
    }
    let p = head_subbuf(&rb);
    let commit = u64::from_le_bytes(p[8..16].try_into().unwrap());
    assert_eq!(
        commit, 4080,
        "a page closed with >= 8 bytes left commits the whole page"
    );
    // Discarded-event padding: type 29, delta 1, array[0] = rest - 4.
    assert_eq!(word(&p, 16 + 4056), (1 << 5) | 29);
    assert_eq!(word(&p, 16 + 4060), 4080 - 4056 - 4);
}

#[test]
fn nested_writers_publish_only_when_the_outermost_commits() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(100);
    let rb = RingBuffer::new(Config::new(1, 4), &alloc, &clock).unwrap();
    let mut a = rb.reserve(cpu0(), 4).unwrap(); // task, ts 100
    a.payload_mut().copy_from_slice(b"task");
    clock.advance(5);
    let mut b = rb.reserve(cpu0(), 7).unwrap(); // softirq, ts 105
    b.payload_mut().copy_from_slice(b"softirq");
    clock.advance(5);
    let mut c = rb.reserve(cpu0(), 3).unwrap(); // irq, ts 110
    c.payload_mut().copy_from_slice(b"irq");
    clock.advance(5);
    rb.write(cpu0(), b"nmi").unwrap(); // ts 115
    c.commit();
    b.commit();
    assert!(
        rb.reader(0).unwrap().next_event().is_none(),
        "published before the outermost commit"
    );
    a.commit();
    clock.advance(5);
    rb.write(cpu0(), b"after").unwrap(); // ts 120, plain delta again
    let mut r = rb.reader(0).unwrap();
    let mut got = Vec::new();
    while let Some(e) = r.next_event() {
        got.push((e.ts, e.payload.to_vec()));
    }
    drop(r);
    let want: Vec<(u64, Vec<u8>)> = vec![
        (100, b"task".to_vec()),
        (105, b"softirq\0".to_vec()),
        (110, b"irq\0".to_vec()),
        (115, b"nmi\0".to_vec()),
        (120, b"after\0\0\0".to_vec()),
    ];
    assert_eq!(got, want);
    let st = rb.stats(0).unwrap();
    assert_eq!((st.entries, st.read, st.unread()), (5, 5, 0));

    // The nested events carry absolute time stamps (type 31).
    let alloc2 = HeapPages::default();
    let clock2 = ManualClock::new(100);
    let rb2 = RingBuffer::new(Config::new(1, 4), &alloc2, &clock2).unwrap();
    rb2.write(cpu0(), b"x").unwrap();
    let a = rb2.reserve(cpu0(), 4).unwrap();
    clock2.advance(9);
    rb2.write(cpu0(), b"y").unwrap();
    a.commit();
    let p = head_subbuf(&rb2);
    // x (8 bytes), a (8 bytes, delta 0), then the time stamp 109 and y.
    assert_eq!(word(&p, 16 + 16), (109 << 5) | 31);
    assert_eq!(word(&p, 16 + 20), 0);
    assert_eq!(word(&p, 16 + 24), 1);
}

#[test]
fn nested_writer_moves_the_page_under_a_reservation() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(1);
    let rb = RingBuffer::new(Config::new(1, 4), &alloc, &clock).unwrap();
    let mut a = rb.reserve(cpu0(), 100).unwrap();
    a.payload_mut().fill(0xaa);
    for i in 0..100u8 {
        clock.advance(1);
        rb.write(cpu0(), &[i; 60]).unwrap(); // spans two more pages
    }
    a.commit();
    let mut r = rb.reader(0).unwrap();
    let first = r.next_event().unwrap();
    assert_eq!((first.ts, first.payload), (1, &[0xaa; 100][..]));
    for i in 0..100u8 {
        let e = r.next_event().unwrap();
        assert_eq!((e.ts, e.payload), (2 + u64::from(i), &[i; 60][..]));
    }
    assert!(r.next_event().is_none());
}

#[test]
fn nested_writer_cannot_wrap_onto_uncommitted_data() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(1);
    let rb = RingBuffer::new(Config::new(1, 2), &alloc, &clock).unwrap();
    let a = rb.reserve(cpu0(), 8).unwrap();
    let mut errs = 0;
    for _ in 0..200 {
        match rb.write(cpu0(), &[1; 100]) {
            Ok(()) => {}
            Err(Error::Full) => errs += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        errs > 0,
        "the ring wrapped onto the open reservation without dropping"
    );
    assert_eq!(rb.stats(0).unwrap().dropped, errs);
    a.commit();
}

#[test]
fn dropped_reservation_is_a_discarded_event() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(50);
    let rb = RingBuffer::new(Config::new(1, 2), &alloc, &clock).unwrap();
    rb.write(cpu0(), b"keep").unwrap();
    let mut d = rb.reserve(cpu0(), 20).unwrap();
    d.payload_mut().fill(1);
    drop(d);
    clock.advance(3);
    rb.write(cpu0(), b"next").unwrap();
    let p = head_subbuf(&rb);
    assert_eq!(
        word(&p, 16 + 8),
        (1 << 5) | 29,
        "discarded: padding with delta 1"
    );
    assert_eq!(word(&p, 16 + 12), 24 - 4, "keeps its length");
    let mut r = rb.reader(0).unwrap();
    assert_eq!(r.next_event().unwrap().payload, b"keep");
    let e = r.next_event().unwrap();
    assert_eq!((e.ts, e.payload), (53, &b"next"[..]));
    assert!(r.next_event().is_none());
    drop(r);
    assert_eq!(rb.stats(0).unwrap().entries, 2);
}

#[test]
fn limits_and_disable() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    assert_eq!(
        RingBuffer::new(Config::new(1, 1), &alloc, &clock).err(),
        Some(Error::InvalidArgument)
    );
    assert_eq!(
        RingBuffer::new(Config::new(0, 4), &alloc, &clock).err(),
        Some(Error::InvalidArgument)
    );
    assert_eq!(
        RingBuffer::new(Config::new(1, 4).subbuf_order(9), &alloc, &clock).err(),
        Some(Error::InvalidArgument)
    );
    let rb = RingBuffer::new(Config::new(2, 2).subbuf_order(8), &alloc, &clock).unwrap();
    assert_eq!(rb.subbuf_size(), 1 << 20);
    let max = rb.max_payload();
    assert_eq!(max, (1 << 20) - 24);
    rb.write(cpu0(), &vec![3; max]).unwrap();
    assert_eq!(
        rb.write(cpu0(), &vec![3; max + 1]),
        Err(Error::EventTooLarge)
    );
    // SAFETY: this thread is the only writer of CPU 1 of this buffer.
    let cpu1 = unsafe { oskit_ring_buffer::LocalCpu::new(1) };
    // SAFETY: CPU 2 does not exist; nothing is written.
    let cpu2 = unsafe { oskit_ring_buffer::LocalCpu::new(2) };
    assert_eq!(rb.write(cpu2, b"x"), Err(Error::InvalidArgument));
    rb.record_disable();
    assert_eq!(rb.write(cpu0(), b"x"), Err(Error::Disabled));
    rb.record_enable();
    rb.record_disable_cpu(1).unwrap();
    assert_eq!(rb.is_recording(1), Ok(false));
    assert_eq!(rb.write(cpu1, b"x"), Err(Error::Disabled));
    rb.write(cpu0(), b"x").unwrap();
    rb.record_enable_cpu(1).unwrap();
    rb.write(cpu1, b"x").unwrap();
    let mut r = rb.reader(0).unwrap();
    assert_eq!(r.next_event().unwrap().payload.len(), max.div_ceil(4) * 4);
    assert_eq!(r.next_event().unwrap().payload, b"x\0\0\0");
    assert!(r.next_event().is_none());
    drop(r);
    assert_eq!(Error::EventTooLarge.errno(), 7);
    assert_eq!(Error::NotMapped.errno(), 19);
    assert_eq!(Error::Busy.errno(), 16);
}

#[test]
fn reset_empties_and_zeroes() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let rb = RingBuffer::new(Config::new(1, 3), &alloc, &clock).unwrap();
    for i in 0..500u32 {
        clock.advance(1);
        rb.write(cpu0(), &i.to_le_bytes()).unwrap();
    }
    rb.reader(0).unwrap().next_event().unwrap();
    rb.reset(cpu0()).unwrap();
    assert_eq!(rb.stats(0).unwrap(), Default::default());
    assert!(rb.reader(0).unwrap().next_event().is_none());
    clock.advance(1);
    rb.write(cpu0(), b"new!").unwrap();
    let mut r = rb.reader(0).unwrap();
    assert_eq!(r.next_event().unwrap().payload, b"new!");
    assert!(r.next_event().is_none());
    // A writer inside its critical section makes reset give up instead of deadlocking.
    drop(r);
    let open = rb.reserve(cpu0(), 4).unwrap();
    assert_eq!(rb.reset(cpu0()), Err(Error::Busy));
    open.commit();
    assert_eq!(rb.is_recording(0), Ok(true));
}

#[test]
fn waiter_wakes_at_buffer_percent() {
    struct Count(AtomicUsize);
    impl Waiter for Count {
        fn wake(&self, cpu: usize) {
            assert_eq!(cpu, 0);
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let w = Count(AtomicUsize::new(0));
    let rb = RingBuffer::with_waiter(Config::new(1, 4), &alloc, &clock, &w).unwrap();
    rb.set_buffer_percent(0).unwrap();
    rb.write(cpu0(), b"a").unwrap();
    assert_eq!(w.0.load(Ordering::SeqCst), 1);
    rb.write(cpu0(), b"b").unwrap();
    assert_eq!(
        w.0.load(Ordering::SeqCst),
        1,
        "disarmed until the reader re-arms"
    );
    rb.arm_waiter(0).unwrap();
    rb.set_buffer_percent(50).unwrap();
    rb.write(cpu0(), b"c").unwrap();
    assert_eq!(w.0.load(Ordering::SeqCst), 1, "below 50%");
    for _ in 0..140 {
        rb.write(cpu0(), &[0; 60]).unwrap(); // 140 * 64 bytes: two pages filled
    }
    assert_eq!(w.0.load(Ordering::SeqCst), 2);
    assert_eq!(rb.set_buffer_percent(101), Err(Error::InvalidArgument));
}

#[test]
fn page_pool_backs_a_buffer_without_leaks() {
    let layout = std::alloc::Layout::new::<PagePool<16>>();
    // SAFETY: the layout is not zero-sized (16 pages); all-zero bytes are a valid empty
    // `PagePool` (atomics false, zeroed pages), and the allocation is the global allocator's
    // with `PagePool`'s own layout, as `Box::from_raw` needs.
    let pool: Box<PagePool<16>> = unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<PagePool<16>>();
        assert!(!p.is_null(), "out of memory");
        Box::from_raw(p)
    };
    let clock = ManualClock::new(0);
    {
        let rb = RingBuffer::new(Config::new(2, 3), &*pool, &clock).unwrap();
        assert!(pool.used_pages() >= 8 + 2);
        rb.map(1).unwrap();
        rb.write(cpu0(), b"pool").unwrap();
        assert_eq!(rb.reader(0).unwrap().next_event().unwrap().payload, b"pool");
    }
    assert_eq!(pool.used_pages(), 0);
    // Too big for the pool: NoMemory, and nothing kept.
    assert_eq!(
        RingBuffer::new(Config::new(4, 3), &*pool, &clock).err(),
        Some(Error::NoMemory)
    );
    assert_eq!(pool.used_pages(), 0);
}

#[test]
fn mode_switch_and_producer_consumer_counts() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    let rb = RingBuffer::new(
        Config::new(1, 2).mode(Mode::ProducerConsumer),
        &alloc,
        &clock,
    )
    .unwrap();
    let mut ok = 0u64;
    let mut full = 0u64;
    for _ in 0..200 {
        match rb.write(cpu0(), &[1; 100]) {
            Ok(()) => ok += 1,
            Err(Error::Full) => full += 1,
            Err(e) => panic!("{e}"),
        }
    }
    let st = rb.stats(0).unwrap();
    assert_eq!((st.entries, st.dropped, st.overrun), (ok, full, 0));
    assert!(full > 0);
    rb.set_mode(Mode::Overwrite);
    rb.write(cpu0(), &[1; 100]).unwrap();
    rb.write(cpu0(), &[1; 4000]).unwrap();
    let st = rb.stats(0).unwrap();
    assert!(st.overrun > 0);
    assert_eq!(st.unread(), st.entries - st.overrun);
    let _ = format::PAGE_SIZE;
}

#[test]
fn swap_cpu_exchanges_buffers() {
    let alloc = HeapPages::default();
    let clock = ManualClock::new(0);
    {
        let a = RingBuffer::new(Config::new(1, 3), &alloc, &clock).unwrap();
        let b = RingBuffer::new(Config::new(1, 3), &alloc, &clock).unwrap();
        let odd = RingBuffer::new(Config::new(1, 4), &alloc, &clock).unwrap();
        for i in 0..300u32 {
            clock.advance(1);
            a.write(cpu0(), &i.to_le_bytes()).unwrap();
        }
        b.write(cpu0(), b"bbbb").unwrap();
        let (sa, sb) = (a.stats(0).unwrap(), b.stats(0).unwrap());
        // SAFETY: this thread is the only writer and is not writing.
        unsafe {
            assert_eq!(a.swap_cpu(&odd, 0), Err(Error::InvalidArgument));
            b.map(0).unwrap();
            assert_eq!(a.swap_cpu(&b, 0), Err(Error::Busy));
            b.unmap(0).unwrap();
            a.swap_cpu(&b, 0).unwrap();
        }
        assert_eq!((a.stats(0).unwrap(), b.stats(0).unwrap()), (sb, sa));
        assert_eq!(a.reader(0).unwrap().next_event().unwrap().payload, b"bbbb");
        let mut r = b.reader(0).unwrap();
        let mut n = 0u32;
        while let Some(e) = r.next_event() {
            assert_eq!(e.payload, n.to_le_bytes());
            n += 1;
        }
        assert_eq!(n, 300);
        drop(r);
        // Both keep working after the exchange.
        a.write(cpu0(), b"more").unwrap();
        assert_eq!(a.reader(0).unwrap().next_event().unwrap().payload, b"more");
    }
    assert_eq!(
        alloc.outstanding.load(Ordering::Relaxed),
        0,
        "pages leaked or double-freed"
    );
}

#[test]
fn pages_needed_is_what_new_takes() {
    let configs: &[(usize, usize, u32)] = if cfg!(miri) {
        &[(1, 2, 0), (3, 7, 1)]
    } else {
        &[(1, 2, 0), (2, 4, 0), (3, 7, 1), (4, 100, 0), (2, 300, 2)]
    };
    for &(cpus, subbufs, order) in configs {
        let config = Config::new(cpus, subbufs).subbuf_order(order);
        let alloc = HeapPages::default();
        let rb = RingBuffer::new(config, &alloc, ManualClock::new(0)).unwrap();
        assert_eq!(
            alloc.outstanding.load(Ordering::Relaxed) as usize,
            config.pages_needed(),
            "{config:?}"
        );
        drop(rb);
    }
}

#[test]
fn a_page_pool_of_pages_needed_is_enough() {
    const CONFIG: Config = Config::new(2, 6);
    static POOL: PagePool<{ CONFIG.pages_needed() }> = PagePool::new();
    static SMALL: PagePool<{ CONFIG.pages_needed() - 1 }> = PagePool::new();
    assert!(RingBuffer::new(CONFIG, &POOL, ManualClock::new(0)).is_ok());
    assert_eq!(
        RingBuffer::new(CONFIG, &SMALL, ManualClock::new(0)).err(),
        Some(Error::NoMemory)
    );
}

#[test]
fn try_reader_is_busy_while_the_reader_lock_is_held() {
    let alloc = HeapPages::default();
    let rb = RingBuffer::new(Config::new(2, 2), &alloc, ManualClock::new(0)).unwrap();
    rb.write(cpu0(), b"x").unwrap();
    let held = rb.reader(0).unwrap();
    assert_eq!(rb.try_reader(0).err(), Some(Error::Busy));
    assert!(rb.try_reader(1).is_ok(), "another CPU's lock is free");
    drop(held);
    let mut r = rb.try_reader(0).unwrap();
    assert_eq!(r.next_event().unwrap().payload, b"x\0\0\0");
    assert_eq!(rb.try_reader(2).err(), Some(Error::InvalidArgument));
}

#[test]
fn typed_events_round_trip() {
    #[derive(zerocopy::IntoBytes, zerocopy::FromBytes, zerocopy::Immutable, Debug, PartialEq)]
    #[repr(C)]
    struct Sched {
        prev: u32,
        next: u32,
        at: u64,
        state: u8,
        _pad: [u8; 7],
    }
    let alloc = HeapPages::default();
    let rb = RingBuffer::new(Config::new(1, 2), &alloc, ManualClock::new(0)).unwrap();
    let ev = Sched {
        prev: 7,
        next: 9,
        at: 0x1122_3344_5566_7788,
        state: 2,
        _pad: [0; 7],
    };
    rb.write_value(cpu0(), &ev).unwrap();
    rb.write_value(cpu0(), &3u16).unwrap();
    let mut r = rb.reader(0).unwrap();
    assert_eq!(r.next_event().unwrap().read_as::<Sched>(), Some(ev));
    let short = r.next_event().unwrap();
    assert_eq!(short.read_as::<u16>(), Some(3));
    assert_eq!(
        short.read_as::<Sched>(),
        None,
        "payload shorter than the type"
    );
}
