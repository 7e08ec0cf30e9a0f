//! What the software host can be made to do wrong and what it checks: injectable faults and
//! the violations it records at the suspend hypercall or finds in an audit.

use crate::error::{Step, errno};

/// A step of the host or of a guest service that the model can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Fault {
    /// [`Freezer::freeze`](crate::hal::Freezer::freeze).
    Freeze,
    /// [`Devices::suspend`](crate::hal::Devices::suspend).
    DeviceSuspend,
    /// [`StopMachine::stop_machine`](crate::hal::StopMachine::stop_machine).
    StopMachine,
    /// Pinning a root.
    Pin,
    /// [`GrantTable::suspend`](crate::hal::GrantTable::suspend).
    GrantSuspend,
    /// [`Hypervisor::update_va_mapping`](crate::hal::Hypervisor::update_va_mapping) (unmapping shared info).
    UpdateVaMapping,
    /// The suspend hypercall.
    Hypercall,
    /// [`Hypervisor::setup_shared_info`](crate::hal::Hypervisor::setup_shared_info).
    SetupSharedInfo,
    /// [`GrantTable::resume`](crate::hal::GrantTable::resume).
    GrantResume,
    /// Unpinning a root.
    Unpin,
    /// `EVTCHNOP_bind_virq`.
    BindVirq,
    /// `EVTCHNOP_bind_ipi`.
    BindIpi,
    /// `EVTCHNOP_unmask`.
    Unmask,
    /// [`Console::resume`](crate::hal::Console::resume).
    ConsoleResume,
    /// [`EventDelivery::set_callback`](crate::hal::EventDelivery::set_callback).
    Delivery,
}

impl Fault {
    /// Every fault point.
    pub const ALL: [Fault; 15] = [
        Fault::Freeze,
        Fault::DeviceSuspend,
        Fault::StopMachine,
        Fault::Pin,
        Fault::GrantSuspend,
        Fault::UpdateVaMapping,
        Fault::Hypercall,
        Fault::SetupSharedInfo,
        Fault::GrantResume,
        Fault::Unpin,
        Fault::BindVirq,
        Fault::BindIpi,
        Fault::Unmask,
        Fault::ConsoleResume,
        Fault::Delivery,
    ];

    /// The errno the injected failure returns.
    pub const fn errno(self) -> i32 {
        match self {
            Fault::Freeze => errno::EBUSY,
            Fault::DeviceSuspend => errno::EIO,
            Fault::StopMachine | Fault::Pin | Fault::BindVirq | Fault::BindIpi => errno::ENOMEM,
            Fault::GrantSuspend | Fault::GrantResume => errno::ENOSYS,
            Fault::UpdateVaMapping
            | Fault::SetupSharedInfo
            | Fault::Unpin
            | Fault::Unmask
            | Fault::Delivery => errno::EINVAL,
            Fault::Hypercall => errno::EPERM,
            Fault::ConsoleResume => errno::EIO,
        }
    }

    /// The suspend step whose failure it is.
    pub const fn step(self) -> Step {
        match self {
            Fault::Freeze => Step::Freeze,
            Fault::DeviceSuspend => Step::DeviceSuspend,
            Fault::StopMachine => Step::StopMachine,
            Fault::Pin => Step::Pin,
            Fault::GrantSuspend => Step::GrantSuspend,
            Fault::UpdateVaMapping => Step::PreSuspend,
            Fault::Hypercall => Step::Hypercall,
            Fault::SetupSharedInfo => Step::PostSuspend,
            Fault::GrantResume => Step::GrantResume,
            Fault::Unpin => Step::Unpin,
            Fault::BindVirq | Fault::BindIpi | Fault::Unmask => Step::Rebind,
            Fault::ConsoleResume => Step::ConsoleResume,
            Fault::Delivery => Step::Delivery,
        }
    }
}

pub(super) const NR_FAULTS: usize = Fault::ALL.len();

/// A set of guest-state violations the host saw (at the hypercall) or an audit found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Violations(pub u32);

macro_rules! violations {
    ($($(#[$doc:meta])* $name:ident = $bit:expr;)*) => {
        impl Violations {
            $($(#[$doc])* pub const $name: Violations = Violations(1 << $bit);)*
            /// Names of the violations in the set.
            pub fn names(self) -> impl Iterator<Item = &'static str> {
                [$((stringify!($name), Self::$name)),*]
                    .into_iter()
                    .filter(move |(_, v)| self.contains(*v))
                    .map(|(n, _)| n)
            }
        }
    };
}

violations! {
    /// Hypercall: not issued on CPU 0.
    NOT_CPU0 = 0;
    /// Hypercall: interrupts enabled.
    IRQS_ENABLED = 1;
    /// Hypercall: another CPU is still running.
    CPUS_RUNNING = 2;
    /// Hypercall: a page-table root is not pinned.
    ROOT_UNPINNED = 3;
    /// Hypercall: a user page-table root is loaded.
    USER_ROOT_LOADED = 4;
    /// Hypercall: start info's store frame is not its PFN.
    STORE_NOT_CANONICAL = 5;
    /// Hypercall: start info's console frame is not its PFN.
    CONSOLE_NOT_CANONICAL = 6;
    /// Hypercall: shared info is still mapped.
    SHARED_INFO_MAPPED = 7;
    /// Hypercall: the kernel still points at the real shared info.
    SHARED_INFO_IN_USE = 8;
    /// Hypercall: grant frames are still mapped.
    GRANTS_MAPPED = 9;
    /// Audit: tasks are frozen.
    TASKS_FROZEN = 10;
    /// Audit: devices are suspended.
    DEVICES_SUSPENDED = 11;
    /// Audit: xenbus is suspended or connected to an old domain.
    XENBUS_STALE = 12;
    /// Audit: time keeping is stopped.
    TIME_STOPPED = 13;
    /// Audit: the console is connected to an old domain.
    CONSOLE_STALE = 14;
    /// Audit: start info's store or console frame is not the current domain's MFN.
    FRAME_STALE = 15;
    /// Audit: shared info is not mapped at the current domain's frame, or not in use.
    SHARED_INFO_STALE = 16;
    /// Audit: grant frames are not all mapped in the current domain.
    GRANTS_STALE = 17;
    /// Audit: a root is still save-pinned, or pinned state disagrees with Xen's.
    ROOT_SAVE_PINNED = 18;
    /// Audit: a binding's port is not bound to it in the current domain, or is masked.
    BINDING_STALE = 19;
    /// Audit: CPUs are still stopped or interrupts off.
    CPUS_STOPPED = 20;
    /// Hypercall: tasks are not frozen.
    TASKS_RUNNING = 21;
    /// Hypercall: devices are not suspended.
    DEVICES_RUNNING = 22;
    /// Hypercall: xenbus is not suspended.
    XENBUS_RUNNING = 23;
    /// Hypercall: time keeping was not suspended.
    TIME_RUNNING = 24;
    /// Audit: the host has more VIRQ/IPI ports bound than the guest's table has bindings
    /// (a port leaked: bound at the hypervisor, unknown to the guest).
    PORT_LEAK = 25;
    /// Audit: event delivery is not set up in the current domain (no callback, a vCPU's
    /// `vcpu_info` not registered) or the guest's store/console channels are stale.
    DELIVERY_STALE = 26;
    /// Audit: an event was delivered on a port bound to nothing of the guest's (a stale
    /// pending bit the mask sweep missed).
    STRAY_EVENT = 27;
}

impl Violations {
    /// No violation.
    pub const NONE: Violations = Violations(0);

    /// Whether every violation of `other` is in the set.
    pub const fn contains(self, other: Violations) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl core::ops::BitOr for Violations {
    type Output = Violations;
    fn bitor(self, rhs: Violations) -> Violations {
        Violations(self.0 | rhs.0)
    }
}

impl core::ops::BitOrAssign for Violations {
    fn bitor_assign(&mut self, rhs: Violations) {
        self.0 |= rhs.0;
    }
}
