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
    /// A huge (PS) entry at the PMD or PUD level maps `addr`: this crate copies and zaps
    /// last-level tables only, and will not skip or split a huge mapping silently.
    HugeMapping {
        /// The first address of the range that the huge entry maps.
        addr: u64,
    },
    /// Fork met a device-exclusive entry at `addr` and no device revoked its exclusive access
    /// ([`FolioOps::restore_device_exclusive`](crate::FolioOps::restore_device_exclusive)).
    DeviceExclusive {
        /// The entry's address.
        addr: u64,
    },
    /// The entry at `addr` contradicts its folio metadata (a device-private page that claims to
    /// be DMA-pinned).
    InvalidEntry {
        /// The entry's address.
        addr: u64,
    },
}

impl Error {
    /// The Linux errno this error corresponds to (positive value).
    pub const fn errno(self) -> i32 {
        match self {
            Error::Again => 11,                  // EAGAIN
            Error::NoMemory => 12,               // ENOMEM
            Error::HardwarePoison => 133,        // EHWPOISON
            Error::InvalidRange => 22,           // EINVAL
            Error::HugeMapping { .. } => 95,     // EOPNOTSUPP
            Error::DeviceExclusive { .. } => 16, // EBUSY
            Error::InvalidEntry { .. } => 5,     // EIO
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Again => {
                f.write_str("a preallocated page is needed to copy a possibly pinned page")
            }
            Error::NoMemory => f.write_str("out of memory"),
            Error::HardwarePoison => f.write_str("source page is poisoned"),
            Error::InvalidRange => f.write_str("invalid address range"),
            Error::HugeMapping { addr } => write!(f, "huge (PMD/PUD) mapping at {addr:#x}"),
            Error::DeviceExclusive { addr } => {
                write!(f, "device-exclusive entry at {addr:#x} not restored")
            }
            Error::InvalidEntry { addr } => {
                write!(f, "entry at {addr:#x} contradicts its folio metadata")
            }
        }
    }
}

impl core::error::Error for Error {}
