//! The clocks the ring buffer is written against.

use oskit_ring_buffer::{hal::Clock, sim::ManualClock};

#[test]
fn manual_clock_moves_only_when_told_and_saturates() {
    let clock = ManualClock::new(7);
    assert_eq!(clock.now(), 7);
    assert_eq!(clock.now(), 7);
    assert_eq!(clock.advance(3), 10);
    clock.advance(u64::MAX);
    assert_eq!(clock.now(), u64::MAX);
}

#[cfg(all(feature = "x86", target_arch = "x86_64"))]
#[test]
fn tsc_does_not_go_backwards() {
    let tsc = oskit_ring_buffer::x86::Tsc;
    let a = tsc.now();
    let b = tsc.now();
    assert!(b >= a, "TSC went backwards: {a} then {b}");
}
