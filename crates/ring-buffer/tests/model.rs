//! Property tests against a reference model: a queue of `(ts, payload)`.

mod common;

use std::collections::VecDeque;

use common::{HeapPages, Rng, cpu0, payload, stored};
use oskit_ring_buffer::{
    Clock, Config, Error, Mode, RingBuffer,
    format::{self, MAX_SMALL_DATA},
    sim::ManualClock,
};

struct Expect {
    ts: u64,
    data: Vec<u8>,
}

/// Sizes the issue asks for, plus random ones.
fn pick_len(rng: &mut Rng, max: usize) -> usize {
    match rng.below(10) {
        0 => 0,
        1 => 1,
        2 => MAX_SMALL_DATA,
        3 => MAX_SMALL_DATA + 1,
        4 => max,
        5 => max + 1,
        6 => rng.below(16) as usize,
        _ => rng.below(max as u64 / 4) as usize,
    }
}

/// Clock gaps: mostly small, some that need a time extend, a few enormous.
fn pick_gap(rng: &mut Rng) -> u64 {
    match rng.below(20) {
        0 => 1 << 27,
        1 => (1 << 27) - 1,
        2 => 1 << 40,
        3 => rng.below(1 << 33),
        _ => 1 + rng.below(1000),
    }
}

fn run(seed: u64, mode: Mode, order: u32, subbufs: usize, ops: usize) {
    let mut rng = Rng::new(seed);
    let clock = ManualClock::new(rng.below(1 << 50));
    let alloc = HeapPages::default();
    let rb = RingBuffer::new(
        Config::new(1, subbufs).subbuf_order(order).mode(mode),
        &alloc,
        &clock,
    )
    .unwrap();
    let max = rb.max_payload();
    assert_eq!(max, format::max_payload(4096 << order));
    let mut model: VecDeque<Expect> = VecDeque::new();
    let (mut committed, mut dropped, mut overrun_seen, mut consumed) = (0u64, 0u64, 0u64, 0u64);
    let mut seq = 0u64;

    let consume =
        |model: &mut VecDeque<Expect>, n: usize, consumed: &mut u64, overrun_seen: &mut u64| {
            let mut r = rb.reader(0).unwrap();
            for _ in 0..n {
                let Some(ev) = r.next_event() else {
                    assert!(
                        model.is_empty(),
                        "seed {seed}: reader empty, model has {}",
                        model.len()
                    );
                    break;
                };
                // Overwritten events are the oldest ones, exactly as many as reported lost.
                let pos = model
                    .iter()
                    .position(|e| e.ts == ev.ts)
                    .unwrap_or_else(|| panic!("seed {seed}: event ts {} not in model", ev.ts));
                assert_eq!(
                    pos as u64, ev.lost,
                    "seed {seed}: lost count != skipped events"
                );
                if mode == Mode::ProducerConsumer {
                    assert_eq!(ev.lost, 0, "seed {seed}: producer/consumer mode overwrote");
                }
                *overrun_seen += ev.lost;
                model.drain(..pos);
                let e = model.pop_front().unwrap();
                assert_eq!(
                    ev.payload,
                    stored(&e.data),
                    "seed {seed}: payload of ts {}",
                    e.ts
                );
                *consumed += 1;
            }
        };

    for _ in 0..ops {
        match rng.below(100) {
            0..=59 => {
                clock.advance(pick_gap(&mut rng));
                let len = pick_len(&mut rng, max);
                let data = payload(seq, len);
                seq += 1;
                match rb.write(cpu0(), &data) {
                    Ok(()) => {
                        committed += 1;
                        model.push_back(Expect {
                            ts: clock.now(),
                            data,
                        });
                    }
                    Err(Error::EventTooLarge) => assert!(len > max, "seed {seed}: {len} refused"),
                    Err(Error::Full) => {
                        assert_eq!(mode, Mode::ProducerConsumer);
                        dropped += 1;
                    }
                    Err(e) => panic!("seed {seed}: write failed: {e}"),
                }
            }
            60..=69 => {
                // Nested writers: an outer reservation interrupted by up to 4 levels.
                clock.advance(pick_gap(&mut rng));
                let len = rng.below(200) as usize;
                let outer_ts = clock.now();
                let Ok(mut outer) = rb.reserve(cpu0(), len) else {
                    dropped += 1;
                    continue;
                };
                let slot = model.len();
                model.push_back(Expect {
                    ts: outer_ts,
                    data: payload(seq, len),
                });
                outer.payload_mut().copy_from_slice(&payload(seq, len));
                seq += 1;
                let depth = 1 + rng.below(4);
                #[allow(clippy::too_many_arguments)]
                fn nest(
                    rb: &RingBuffer<&HeapPages, &ManualClock>,
                    clock: &ManualClock,
                    rng: &mut Rng,
                    model: &mut VecDeque<Expect>,
                    seq: &mut u64,
                    depth: u64,
                    committed: &mut u64,
                    dropped: &mut u64,
                ) {
                    if depth == 0 {
                        return;
                    }
                    clock.advance(1 + rng.below(50));
                    let len = rng.below(300) as usize;
                    let data = payload(*seq, len);
                    *seq += 1;
                    let ts = clock.now();
                    let Ok(mut r) = rb.reserve(common::cpu0(), len) else {
                        *dropped += 1;
                        return;
                    };
                    model.push_back(Expect {
                        ts,
                        data: data.clone(),
                    });
                    r.payload_mut().copy_from_slice(&data);
                    nest(rb, clock, rng, model, seq, depth - 1, committed, dropped);
                    r.commit();
                    *committed += 1;
                }
                nest(
                    &rb,
                    &clock,
                    &mut rng,
                    &mut model,
                    &mut seq,
                    depth,
                    &mut committed,
                    &mut dropped,
                );
                if rng.chance(20) {
                    drop(outer); // discarded
                    model.remove(slot);
                } else {
                    outer.commit();
                    committed += 1;
                }
            }
            70..=72 => {
                // A discarded event.
                clock.advance(pick_gap(&mut rng));
                match rb.reserve(cpu0(), rng.below(64) as usize) {
                    Ok(mut r) => {
                        r.payload_mut().fill(0xee);
                        drop(r);
                    }
                    Err(Error::Full) => dropped += 1,
                    Err(e) => panic!("seed {seed}: reserve failed: {e}"),
                }
            }
            73..=75 => {
                let mut r = rb.reader(0).unwrap();
                let peeked = r.peek().map(|e| (e.ts, e.payload.to_vec()));
                let next = r.next_event().map(|e| (e.ts, e.payload.to_vec()));
                assert_eq!(peeked, next, "seed {seed}: peek != next");
                drop(r);
                if let Some((ts, _)) = next {
                    let pos = model.iter().position(|e| e.ts == ts).unwrap();
                    model.drain(..=pos);
                    consumed += 1;
                    overrun_seen += pos as u64;
                }
            }
            _ => {
                let n = rng.below(40) as usize;
                consume(&mut model, n, &mut consumed, &mut overrun_seen);
            }
        }
    }
    consume(&mut model, usize::MAX, &mut consumed, &mut overrun_seen);
    assert!(model.is_empty());
    let st = rb.stats(0).unwrap();
    assert_eq!(st.entries, committed, "seed {seed}: entries");
    assert_eq!(st.read, consumed, "seed {seed}: read");
    assert_eq!(st.overrun, overrun_seen, "seed {seed}: overrun");
    assert_eq!(st.dropped, dropped, "seed {seed}: dropped");
    assert_eq!(st.unread(), 0, "seed {seed}: unread after drain");
}

/// Seeds per mode (a few under miri, which runs about a thousand times slower).
const SEEDS: u64 = if cfg!(miri) { 3 } else { 60 };

#[test]
fn overwrite_mode_matches_model() {
    for seed in 0..SEEDS {
        run(
            seed,
            Mode::Overwrite,
            (seed % 3 == 0) as u32,
            2 + (seed % 4) as usize,
            1500,
        );
    }
}

#[test]
fn producer_consumer_mode_matches_model() {
    for seed in 100..100 + SEEDS {
        run(
            seed,
            Mode::ProducerConsumer,
            (seed % 3 == 0) as u32,
            2 + (seed % 4) as usize,
            1500,
        );
    }
}
