//! The errors of copy and zap.

use core::fmt;

/// Why a copy or zap could not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// The page may be DMA-pinned by the parent: the child needs its own copy, so a page must be
    /// preallocated and the call repeated. The range loops handle this themselves; only
    /// [`Fork::copy_present_ptes`](crate::Fork::copy_present_ptes) returns it.
    Again,
    /// No memory for a preallocated page, a page table, or a swap-count continuation.
    NoMemory,
    /// Copying a page for the child failed because the source page is poisoned.
    HardwarePoison,
    /// An address range that is not page aligned, is reversed, or leaves one page table where
    /// one was required.
    InvalidRange,
}

impl Error {
    /// The Linux errno this error corresponds to (positive value).
    pub const fn errno(self) -> i32 {
        match self {
            Error::Again => 11,           // EAGAIN
            Error::NoMemory => 12,        // ENOMEM
            Error::HardwarePoison => 133, // EHWPOISON
            Error::InvalidRange => 22,    // EINVAL
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::Again => "a preallocated page is needed to copy a possibly pinned page",
            Error::NoMemory => "out of memory",
            Error::HardwarePoison => "source page is poisoned",
            Error::InvalidRange => "invalid address range",
        })
    }
}

impl core::error::Error for Error {}
