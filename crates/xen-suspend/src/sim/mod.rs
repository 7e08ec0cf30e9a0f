//! Software model of the hardware: CPUID of a Xen (or other) host, a Xen host with one domain
//! and the guest services around a suspend, page-table roots, and a xenstore. `no_std`, no
//! allocation: usable by tests, fuzzing, benches and a bare-metal kernel alike.

mod faults;
mod host;
mod page_tables;
mod store;

pub use faults::{Fault, Violations};
pub use host::{
    DeviceLog, DeviceOp, PortState, SIM_DEVICES, SIM_SHARED_INFO_VA, SimConfig, SimDevice,
    SimGuest, SimPlan, SimPort, SimXen,
};
pub use page_tables::SimPageTables;
pub use store::{MAX_PATH, MAX_VALUE, SimStore};

use crate::hal::Cpuid;

/// The [`crate::hal::Platform`] of a simulated guest: every service a [`SimGuest`], page
/// tables a [`SimPageTables`].
pub struct SimPlatform<'h, 'p, 'r, const CPUS: usize, const PORTS: usize>(
    core::marker::PhantomData<&'p mut SimPageTables<'h, 'r, CPUS, PORTS>>,
);

impl<'h, 'p, 'r, const CPUS: usize, const PORTS: usize> crate::hal::Platform
    for SimPlatform<'h, 'p, 'r, CPUS, PORTS>
{
    type Freezer = SimGuest<'h, CPUS, PORTS>;
    type Devices = SimGuest<'h, CPUS, PORTS>;
    type XenBus = SimGuest<'h, CPUS, PORTS>;
    type Stop = SimGuest<'h, CPUS, PORTS>;
    type P2m = SimGuest<'h, CPUS, PORTS>;
    type PageTables = &'p mut SimPageTables<'h, 'r, CPUS, PORTS>;
    type Grants = SimGuest<'h, CPUS, PORTS>;
    type Time = SimGuest<'h, CPUS, PORTS>;
    type Console = SimGuest<'h, CPUS, PORTS>;
    type Hypervisor = SimGuest<'h, CPUS, PORTS>;
}

/// The [`crate::Machine`] of a simulated guest.
pub type SimMachine<'h, 'p, 'r, const CPUS: usize, const PORTS: usize> =
    crate::Machine<SimPlatform<'h, 'p, 'r, CPUS, PORTS>>;

impl<'h, 'r, const CPUS: usize, const PORTS: usize> SimPageTables<'h, 'r, CPUS, PORTS> {
    /// A [`crate::Machine`] whose services are all `guest` and whose page tables are `self`.
    pub fn machine<'p>(
        &'p mut self,
        guest: SimGuest<'h, CPUS, PORTS>,
    ) -> SimMachine<'h, 'p, 'r, CPUS, PORTS> {
        crate::Machine {
            freezer: guest,
            devices: guest,
            xenbus: guest,
            stop: guest,
            p2m: guest,
            page_tables: self,
            grants: guest,
            time: guest,
            console: guest,
            hypervisor: guest,
        }
    }
}

/// A CPUID table: leaves not listed read as zero, as on real CPUs past their maximum leaf.
#[derive(Debug, Clone, Default)]
pub struct SimCpuid<'a> {
    leaves: &'a [(u32, [u32; 4])],
}

impl<'a> SimCpuid<'a> {
    /// CPUID answering from `leaves`.
    pub const fn new(leaves: &'a [(u32, [u32; 4])]) -> Self {
        Self { leaves }
    }
}

impl Cpuid for SimCpuid<'_> {
    fn cpuid(&self, leaf: u32) -> [u32; 4] {
        self.leaves
            .iter()
            .find(|(l, _)| *l == leaf)
            .map_or([0; 4], |(_, regs)| *regs)
    }
}
