//! The hardware the ring buffer is written against: a clock.

/// A per-CPU monotonic clock that timestamps events.
///
/// The unit is the consumer's business (Linux uses nanoseconds for the `local` clock and TSC cycles
/// for `x86-tsc`); the ring buffer only stores deltas of it.
pub trait Clock {
    /// Current time. It must not go backwards when read twice on the same CPU.
    fn now(&self) -> u64;
}

impl<T: Clock + ?Sized> Clock for &T {
    fn now(&self) -> u64 {
        (**self).now()
    }
}
