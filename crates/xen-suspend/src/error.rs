//! The crate's error type and the steps of a suspend that can fail.

use core::fmt;

/// Linux errno values this crate reports.
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: i32 = 1;
    /// I/O error.
    pub const EIO: i32 = 5;
    /// Try again.
    pub const EAGAIN: i32 = 11;
    /// Out of memory.
    pub const ENOMEM: i32 = 12;
    /// Device or resource busy.
    pub const EBUSY: i32 = 16;
    /// File exists.
    pub const EEXIST: i32 = 17;
    /// Invalid argument.
    pub const EINVAL: i32 = 22;
    /// No space left on device.
    pub const ENOSPC: i32 = 28;
    /// Result out of range.
    pub const ERANGE: i32 = 34;
    /// Function not implemented.
    pub const ENOSYS: i32 = 38;
    /// No such entry.
    pub const ENOENT: i32 = 2;
    /// No such device.
    pub const ENODEV: i32 = 19;
}

/// A step of [`crate::Machine::suspend`] that can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Freezing tasks.
    Freeze,
    /// Suspending devices.
    DeviceSuspend,
    /// Stopping the other CPUs.
    StopMachine,
    /// Pinning an unpinned page-table root.
    Pin,
    /// Unmapping the grant table.
    GrantSuspend,
    /// Canonicalising start info (an MFN the P2M does not know) or unmapping shared info.
    PreSuspend,
    /// The suspend hypercall itself.
    Hypercall,
    /// Post-suspend: start info's frames back to MFNs, or shared info mapped again.
    PostSuspend,
    /// Mapping the grant table again (fails when the new domain offers fewer frames).
    GrantResume,
    /// Unpinning a root pinned for the save.
    Unpin,
    /// Setting event delivery up again in the new domain (callback, `vcpu_info`, store and
    /// console channels).
    Delivery,
    /// Binding a VIRQ or IPI again in the new domain.
    Rebind,
    /// Resuming the console.
    ConsoleResume,
}

/// Where a suspend left the guest. Whatever happened, the guest is running again: devices
/// resumed, tasks thawed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The suspend hypercall was never issued (or failed): still the same domain.
    NotSuspended,
    /// The hypercall returned "cancelled" (or the domain was only checkpointed): same domain,
    /// same frames, same ports.
    Cancelled,
    /// Resumed in a new domain: new machine frames, new event-channel ports.
    Resumed,
}

/// Errors of this crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Error {
    /// A shutdown or suspend is already in progress (`EBUSY`).
    Busy,
    /// A step of a suspend failed with `errno`; the guest was brought back to `outcome`.
    Suspend {
        /// The first step that failed.
        step: Step,
        /// Its Linux errno.
        errno: i32,
        /// Where the guest ended.
        outcome: Outcome,
    },
    /// The hypervisor returned an event-channel port outside the guest's table, or one that is
    /// already bound (`EINVAL`).
    BadPort(u32),
    /// Every IRQ slot of the guest's event-channel table is in use (`ENOSPC`).
    NoIrq,
    /// The VIRQ or IPI of that CPU is already bound (`EEXIST`).
    AlreadyBound,
    /// VIRQ, IPI or CPU number out of range (`EINVAL`).
    OutOfRange,
    /// An event-channel hypercall failed with this errno.
    Hypervisor(i32),
    /// A xenstore access failed with this errno.
    Store(i32),
    /// Not running on Xen (`ENODEV`).
    NotXen,
    /// A hypercall-page address that is not page-aligned (`EINVAL`).
    Unaligned,
}

impl Error {
    /// The Linux errno (positive) of this error.
    pub const fn errno(&self) -> i32 {
        match *self {
            Error::Busy => errno::EBUSY,
            Error::Suspend { errno, .. } => errno,
            Error::BadPort(_) | Error::OutOfRange | Error::Unaligned => errno::EINVAL,
            Error::NotXen => errno::ENODEV,
            Error::NoIrq => errno::ENOSPC,
            Error::AlreadyBound => errno::EEXIST,
            Error::Hypervisor(e) | Error::Store(e) => e,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Busy => f.write_str("a shutdown is already in progress"),
            Error::Suspend {
                step,
                errno,
                outcome,
            } => write!(
                f,
                "suspend failed at {step:?} (errno {errno}); guest ended {outcome:?}"
            ),
            Error::BadPort(p) => write!(f, "bad event-channel port {p}"),
            Error::NoIrq => f.write_str("no free IRQ slot"),
            Error::AlreadyBound => f.write_str("already bound"),
            Error::OutOfRange => f.write_str("VIRQ, IPI or CPU out of range"),
            Error::Hypervisor(e) => write!(f, "event-channel hypercall failed (errno {e})"),
            Error::Store(e) => write!(f, "xenstore access failed (errno {e})"),
            Error::NotXen => f.write_str("not running on Xen"),
            Error::Unaligned => f.write_str("hypercall page not page-aligned"),
        }
    }
}

impl core::error::Error for Error {}
