//! What [`Bts::config`](crate::Bts::config) takes and [`Bts::status`](crate::Bts::status)
//! reports: the flags, the configuration and the status.

/// Configuration flags (the `PTRACE_BTS_O_*` values, plus the overflow and CPL filters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Flags(pub u32);

impl Flags {
    /// Record branches taken at CPL > 0 (user mode); kernel branches only with
    /// [`KERNEL`](Flags::KERNEL).
    pub const TRACE: Flags = Flags(0x1);
    /// Record "task arrives/departs" timestamps at context switches.
    pub const SCHED: Flags = Flags(0x2);
    /// On overflow, send [`Config::signal`] to the task and stop tracing until the trace is
    /// drained or cleared, instead of wrapping around.
    pub const SIGNAL: Flags = Flags(0x4);
    /// (Re)allocate the buffer with [`Config::size`] bytes; size 0 frees it.
    pub const ALLOC: Flags = Flags(0x8);
    /// On overflow, drain the buffer into the [`RecordSink`](crate::hal::RecordSink) given to
    /// the threshold-interrupt handler, instead of wrapping around.
    pub const INTERRUPT: Flags = Flags(0x10);
    /// Do not record branches taken at CPL 0 (DEBUGCTL.BTS_OFF_OS). This is the default;
    /// the flag is kept for callers that spell it out, and conflicts with
    /// [`KERNEL`](Flags::KERNEL).
    pub const NO_KERNEL: Flags = Flags(0x20);
    /// Do not record branches taken at CPL > 0 (DEBUGCTL.BTS_OFF_USR).
    pub const NO_USER: Flags = Flags(0x40);
    /// Also record branches taken at CPL 0 (clears DEBUGCTL.BTS_OFF_OS): kernel addresses
    /// then reach whoever reads the trace, so only for a tracer allowed to see them (the
    /// kernel itself, a privileged debugger). Linux's ptrace BTS recorded user branches only.
    pub const KERNEL: Flags = Flags(0x80);
    pub(crate) const ALL: u32 = 0xff;

    /// No flag.
    pub const fn empty() -> Self {
        Flags(0)
    }
    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    /// Whether the buffer is circular (neither `SIGNAL` nor `INTERRUPT`).
    pub const fn circular(self) -> bool {
        self.0 & (Self::SIGNAL.0 | Self::INTERRUPT.0) == 0
    }
}

impl core::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

/// What [`Bts::config`](crate::Bts::config) asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Config {
    /// Buffer size in bytes with [`Flags::ALLOC`], rounded down to whole records.
    pub size: usize,
    /// Flags.
    pub flags: Flags,
    /// The overflow signal with [`Flags::SIGNAL`] (0 is invalid).
    pub signal: u32,
}

/// What [`Bts::status`](crate::Bts::status) reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Buffer size in bytes (whole records).
    pub size: usize,
    /// The overflow signal (0 without [`Flags::SIGNAL`]).
    pub signal: u32,
    /// Size of one record in the buffer.
    pub record_size: usize,
    /// The flags in effect.
    pub flags: Flags,
}
