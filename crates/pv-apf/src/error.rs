//! Errors of enabling, disabling and acknowledging async page faults.

use core::{convert::Infallible, fmt};

/// Why an async-PF operation failed. `E` is the hardware backend's MSR error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error<E = Infallible> {
    /// Not running under KVM (no hypervisor, or another one).
    NotKvm,
    /// KVM does not offer an async-PF protocol the configuration allows.
    Unsupported,
    /// The shared area's physical address is not 64-byte aligned.
    Misaligned,
    /// The page-ready vector is an exception vector (below 32).
    BadVector,
    /// Async page faults are already enabled on this CPU.
    AlreadyEnabled,
    /// The MSR access failed.
    Hardware(E),
}

impl<E> Error<E> {
    /// The Linux errno closest to this error (positive value).
    pub fn errno(&self) -> i32 {
        match self {
            Self::NotKvm => 19,         // ENODEV
            Self::Unsupported => 95,    // EOPNOTSUPP
            Self::Misaligned => 22,     // EINVAL
            Self::BadVector => 22,      // EINVAL
            Self::AlreadyEnabled => 16, // EBUSY
            Self::Hardware(_) => 5,     // EIO
        }
    }
}

impl<E: fmt::Debug> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotKvm => f.write_str("not running under KVM"),
            Self::Unsupported => f.write_str("KVM offers no usable async page fault protocol"),
            Self::Misaligned => f.write_str("async PF area is not 64-byte aligned"),
            Self::BadVector => f.write_str("page-ready vector below 32"),
            Self::AlreadyEnabled => f.write_str("async page faults already enabled on this CPU"),
            Self::Hardware(e) => write!(f, "MSR access failed: {e:?}"),
        }
    }
}

impl<E: fmt::Debug> core::error::Error for Error<E> {}
