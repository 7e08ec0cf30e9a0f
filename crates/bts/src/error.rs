//! The error type of every fallible tracer operation.

/// Why a tracer operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Error {
    /// The task has no tracing context, or its context has no buffer (hardware tracer), or it
    /// was untraced (`ESRCH`).
    NoSuchContext,
    /// A bad argument: unknown flags, `SIGNAL` with signal 0, a record index out of range, an
    /// output slice too small to drain into, or tracing requested without a buffer (`EINVAL`).
    InvalidArgument,
    /// No free context slot, the locked-memory limit was reached, or the page allocator failed;
    /// nothing was leaked (`ENOMEM`).
    NoMemory,
    /// Per-task and per-CPU branch tracing cannot be active at the same time (`EPERM`).
    PermissionDenied,
    /// The context is in use: the traced task is running on a CPU with tracing loaded, or
    /// another operation holds it (`EBUSY`). Stop the task and retry.
    Busy,
    /// A switch hook or the threshold interrupt was given a [`BtsCpu`](crate::BtsCpu) bound
    /// to another tracer; nothing was changed (`EINVAL`).
    ForeignCpu,
}

impl Error {
    /// The Linux errno value (positive).
    pub const fn errno(self) -> i32 {
        match self {
            Error::NoSuchContext => 3,
            Error::InvalidArgument => 22,
            Error::NoMemory => 12,
            Error::PermissionDenied => 1,
            Error::Busy => 16,
            Error::ForeignCpu => 22,
        }
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Error::NoSuchContext => "no branch tracing context",
            Error::InvalidArgument => "invalid argument",
            Error::NoMemory => "out of locked memory",
            Error::PermissionDenied => "per-task and per-cpu branch tracing conflict",
            Error::Busy => "branch tracing context busy",
            Error::ForeignCpu => "cpu state bound to another branch tracer",
        })
    }
}

impl core::error::Error for Error {}
