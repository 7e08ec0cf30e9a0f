//! The typed errors of every fallible call, with their Linux errno values.

use core::fmt;

/// Why a ring-buffer operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Error {
    /// A bad argument: a CPU out of range, a bad geometry, a misaligned or oversized mapping
    /// request (`EINVAL`).
    InvalidArgument,
    /// The CPU buffer is not mapped (`ENODEV`, as `ring_buffer_unmap` returns).
    NotMapped,
    /// The operation conflicts with the current state: the buffer is mapped (resize, order
    /// change, `swap_cpu`), the map count would overflow, a reset landed inside a writer, or a
    /// nested writer hit an outer one moving the head (`EBUSY`).
    Busy,
    /// The page allocator had no memory (`ENOMEM`).
    NoMemory,
    /// The event does not fit in one sub-buffer's payload (`E2BIG`). Never truncated.
    EventTooLarge,
    /// Recording is disabled on this buffer or CPU (`EAGAIN`: Linux returns no event).
    Disabled,
    /// Producer/consumer mode and the buffer is full: the event was dropped and counted
    /// (`ENOBUFS`).
    Full,
    /// Bytes read from a mapping (meta page or sub-buffer) are not a valid ring buffer
    /// (`EIO`). Only the user-space side reports this.
    Corrupt,
    /// The get-reader callback (an `ioctl` on Linux) failed with this errno.
    Os(i32),
}

impl Error {
    /// The Linux errno (positive) this error corresponds to.
    pub const fn errno(self) -> i32 {
        match self {
            Error::InvalidArgument => 22, // EINVAL
            Error::NotMapped => 19,       // ENODEV
            Error::Busy => 16,            // EBUSY
            Error::NoMemory => 12,        // ENOMEM
            Error::EventTooLarge => 7,    // E2BIG
            Error::Disabled => 11,        // EAGAIN
            Error::Full => 105,           // ENOBUFS
            Error::Corrupt => 5,          // EIO
            Error::Os(e) => e,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Error::InvalidArgument => "invalid argument",
            Error::NotMapped => "buffer not mapped",
            Error::Busy => "busy",
            Error::NoMemory => "out of memory",
            Error::EventTooLarge => "event larger than a sub-buffer payload",
            Error::Disabled => "recording disabled",
            Error::Full => "buffer full, event dropped",
            Error::Corrupt => "mapping holds an invalid ring buffer",
            Error::Os(e) => return write!(f, "os error {e}"),
        };
        f.write_str(s)
    }
}

impl core::error::Error for Error {}
