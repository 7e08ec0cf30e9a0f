//! The guest's handle on the software host: every guest-service and hypervisor trait
//! implemented against the host's state.

use super::{
    Bus, DeviceOp, Fault, PTE_FLAGS, PortState, SIM_DEVICES, SIM_SHARED_INFO_VA, SimPlan, SimXen,
    State,
};
use crate::abi::Port;
use crate::error::errno;
use crate::hal::{
    Console, Devices, Errno, EventDelivery, Freezer, GrantTable, Hypervisor, P2m, StartInfoFrames,
    StopMachine, SuspendResult, Time, XenBus,
};

/// A handle on a [`SimXen`] implementing every trait but [`crate::hal::PageTables`] (see
/// [`crate::sim::SimPageTables`]). `Copy`: hand one to each field of a [`crate::Machine`].
#[derive(Debug, Clone, Copy)]
pub struct SimGuest<'h, const CPUS: usize, const PORTS: usize> {
    pub(super) host: &'h SimXen<CPUS, PORTS>,
}

impl<'h, const CPUS: usize, const PORTS: usize> SimGuest<'h, CPUS, PORTS> {
    fn with<R>(&self, f: impl FnOnce(&mut State<CPUS, PORTS>) -> R) -> R {
        f(&mut self.host.st.borrow_mut())
    }

    /// The device list of the guest's device model.
    pub fn devices(&self) -> [SimDevice<'h, CPUS, PORTS>; SIM_DEVICES] {
        core::array::from_fn(|i| SimDevice {
            host: self.host,
            index: i as u8,
        })
    }

    pub(crate) fn register_roots(&self, total: usize, pinned: usize) {
        self.with(|st| {
            st.roots_total = total;
            st.roots_pinned = pinned;
        })
    }

    pub(crate) fn pin_root(&self, pin: bool) -> Result<(), Errno> {
        self.with(|st| {
            st.inject(if pin { Fault::Pin } else { Fault::Unpin })?;
            if pin {
                st.roots_pinned += 1;
            } else {
                st.roots_pinned -= 1;
            }
            Ok(())
        })
    }

    pub(crate) fn load_kernel_root(&self) {
        self.with(|st| st.kernel_root = true)
    }
}

impl<const CPUS: usize, const PORTS: usize> Freezer for SimGuest<'_, CPUS, PORTS> {
    type Error = Errno;
    fn freeze(&mut self) -> Result<(), Errno> {
        self.with(|st| {
            st.inject(Fault::Freeze)?;
            st.frozen = true;
            Ok(())
        })
    }
    fn thaw(&mut self) {
        self.with(|st| st.frozen = false)
    }
}

/// One device of the model's device list ([`SIM_DEVICES`] of them); the guest's device model
/// is the list (`[SimDevice]` implements [`Devices`]).
#[derive(Debug, Clone, Copy)]
pub struct SimDevice<'h, const CPUS: usize, const PORTS: usize> {
    host: &'h SimXen<CPUS, PORTS>,
    index: u8,
}

impl<const CPUS: usize, const PORTS: usize> Devices for SimDevice<'_, CPUS, PORTS> {
    type Error = Errno;
    fn suspend(&mut self) -> Result<(), Errno> {
        let mut st = self.host.st.borrow_mut();
        st.inject(Fault::DeviceSuspend)?;
        st.devices[usize::from(self.index)] = true;
        st.device_log.push(self.index, DeviceOp::Suspend);
        Ok(())
    }
    fn resume(&mut self) {
        let mut st = self.host.st.borrow_mut();
        if core::mem::take(&mut st.devices[usize::from(self.index)]) {
            st.device_log.push(self.index, DeviceOp::Resume);
        }
    }
}

impl<const CPUS: usize, const PORTS: usize> Devices for SimGuest<'_, CPUS, PORTS> {
    type Error = Errno;
    fn suspend(&mut self) -> Result<(), Errno> {
        Devices::suspend(&mut self.devices()[..])
    }
    fn resume(&mut self) {
        Devices::resume(&mut self.devices()[..])
    }
}

impl<const CPUS: usize, const PORTS: usize> XenBus for SimGuest<'_, CPUS, PORTS> {
    fn suspend(&mut self) {
        self.with(|st| st.bus = Bus::Suspended)
    }
    fn resume(&mut self) {
        self.with(|st| {
            st.bus = Bus::Connected {
                generation: st.generation,
            }
        })
    }
    fn suspend_cancel(&mut self) {
        // Reconnects to whatever it was connected to: the same domain.
        self.with(|st| {
            st.bus = Bus::Connected {
                generation: st.generation,
            }
        })
    }
}

impl<const CPUS: usize, const PORTS: usize> StopMachine for SimGuest<'_, CPUS, PORTS> {
    type Error = Errno;
    fn stop_machine<R>(&mut self, f: impl FnOnce() -> R) -> Result<R, Errno> {
        let saved = self.with(|st| {
            st.inject(Fault::StopMachine)?;
            let saved = (st.cpu, st.irqs_enabled, st.others_quiesced);
            st.cpu = 0;
            st.irqs_enabled = false;
            st.others_quiesced = true;
            // The stopper thread runs on whatever root was loaded lazily.
            st.kernel_root = false;
            Ok(saved)
        })?;
        let r = f();
        self.with(|st| {
            (st.cpu, st.irqs_enabled, st.others_quiesced) = saved;
            // Interrupts are on again: whatever is pending and unmasked arrives now.
            st.deliver_unmasked();
        });
        Ok(r)
    }
}

impl<const CPUS: usize, const PORTS: usize> P2m for SimGuest<'_, CPUS, PORTS> {
    fn pfn_to_mfn(&self, pfn: u64) -> Option<u64> {
        self.host.mfn_of(pfn)
    }
    fn mfn_to_pfn(&self, mfn: u64) -> Option<u64> {
        let st = self.host.st.borrow();
        let pfn = mfn.checked_sub(st.mfn_base)?;
        (pfn < st.cfg.nr_pages).then_some(pfn)
    }
}

impl<const CPUS: usize, const PORTS: usize> GrantTable for SimGuest<'_, CPUS, PORTS> {
    type Error = Errno;
    fn suspend(&mut self) -> Result<(), Errno> {
        self.with(|st| {
            st.inject(Fault::GrantSuspend)?;
            st.grants_mapped = 0;
            Ok(())
        })
    }
    fn resume(&mut self) -> Result<(), Errno> {
        self.with(|st| {
            st.inject(Fault::GrantResume)?;
            if st.max_grant_frames < st.cfg.grant_frames {
                return Err(Errno(errno::ENOSYS));
            }
            st.grants_mapped = st.cfg.grant_frames;
            st.grants_generation = st.generation;
            Ok(())
        })
    }
}

impl<const CPUS: usize, const PORTS: usize> Time for SimGuest<'_, CPUS, PORTS> {
    fn suspend(&mut self) {
        self.with(|st| st.time_stopped = true)
    }
    fn resume(&mut self) {
        self.with(|st| st.time_stopped = false)
    }
}

impl<const CPUS: usize, const PORTS: usize> Console for SimGuest<'_, CPUS, PORTS> {
    type Error = Errno;
    fn resume(&mut self) -> Result<(), Errno> {
        self.with(|st| {
            st.inject(Fault::ConsoleResume)?;
            st.console_generation = st.generation;
            Ok(())
        })
    }
}

impl<const CPUS: usize, const PORTS: usize> Hypervisor for SimGuest<'_, CPUS, PORTS> {
    type Error = Errno;

    fn bind_virq(&mut self, virq: u32, vcpu: u32) -> Result<Port, Errno> {
        self.with(|st| {
            st.inject(Fault::BindVirq)?;
            // Xen binds a global VIRQ only on vCPU 0.
            if vcpu != 0 && !crate::abi::virq::is_per_vcpu(virq) {
                return Err(Errno(errno::EINVAL));
            }
            let slot = st
                .virq_port
                .get(vcpu as usize)
                .and_then(|v| v.get(virq as usize))
                .copied()
                .ok_or(Errno(errno::EINVAL))?;
            if slot != 0 {
                return Err(Errno(errno::EEXIST));
            }
            let port = st.alloc_port().ok_or(Errno(errno::ENOSPC))?;
            st.ports[port as usize].state = PortState::Virq { virq, vcpu };
            st.virq_port[vcpu as usize][virq as usize] = port;
            Ok(port)
        })
    }

    fn bind_ipi(&mut self, vcpu: u32) -> Result<Port, Errno> {
        self.with(|st| {
            st.inject(Fault::BindIpi)?;
            if vcpu as usize >= CPUS {
                return Err(Errno(errno::EINVAL));
            }
            let port = st.alloc_port().ok_or(Errno(errno::ENOSPC))?;
            st.ports[port as usize].state = PortState::Ipi { vcpu };
            Ok(port)
        })
    }

    fn mask(&mut self, port: Port) {
        self.with(|st| {
            if let Some(p) = st.ports.get_mut(port as usize) {
                p.masked = true;
            }
        })
    }

    fn unmask(&mut self, port: Port) -> Result<(), Errno> {
        self.with(|st| {
            st.inject(Fault::Unmask)?;
            let p = st
                .ports
                .get_mut(port as usize)
                .ok_or(Errno(errno::EINVAL))?;
            p.masked = false;
            if p.pending {
                st.deliver(port);
            }
            Ok(())
        })
    }

    fn close(&mut self, port: Port) -> Result<(), Errno> {
        self.with(|st| {
            let p = st.ports.get(port as usize).ok_or(Errno(errno::EINVAL))?;
            match p.state {
                PortState::Virq { virq, vcpu } => {
                    st.virq_port[vcpu as usize][virq as usize] = 0;
                }
                PortState::Ipi { .. } => {}
                PortState::Free | PortState::Reserved => return Err(Errno(errno::EINVAL)),
            }
            st.ports[port as usize].state = PortState::Free;
            st.ports[port as usize].pending = false;
            Ok(())
        })
    }

    fn max_ports(&self) -> usize {
        PORTS
    }

    fn suspend(&mut self) -> Result<SuspendResult, Errno> {
        self.with(|st| {
            st.inject(Fault::Hypercall)?;
            st.hypercalls += 1;
            let v = st.check_guest();
            st.violations |= v;
            if !v.is_empty() || st.plan == SimPlan::Cancel {
                // The toolstack refuses (or was told to cancel) and resumes the domain.
                return Ok(SuspendResult::Cancelled);
            }
            st.new_domain();
            Ok(SuspendResult::Resumed)
        })
    }

    fn update_va_mapping(&mut self, va: u64, pte: u64, _flags: u64) -> Result<(), Errno> {
        self.with(|st| {
            st.inject(Fault::UpdateVaMapping)?;
            if va != SIM_SHARED_INFO_VA {
                return Err(Errno(errno::EINVAL));
            }
            st.shared_info_pte = pte;
            Ok(())
        })
    }

    fn start_info_frames(&self) -> StartInfoFrames {
        let st = self.host.st.borrow();
        StartInfoFrames {
            store: st.start_info.store_mfn,
            console: st.start_info.console_mfn,
        }
    }

    fn set_start_info_frames(&mut self, frames: StartInfoFrames) {
        self.with(|st| {
            st.start_info.store_mfn = frames.store;
            st.start_info.console_mfn = frames.console;
        })
    }

    fn shared_info_va(&self) -> u64 {
        SIM_SHARED_INFO_VA
    }

    fn use_dummy_shared_info(&mut self) {
        self.with(|st| st.shared_info_dummy = true)
    }

    fn setup_shared_info(&mut self) -> Result<(), Errno> {
        self.with(|st| {
            st.inject(Fault::SetupSharedInfo)?;
            // PV: map the frame start info names at the fixmap, then use it.
            st.shared_info_pte = (st.start_info.shared_info & !0xfff) | PTE_FLAGS;
            st.shared_info_dummy = false;
            Ok(())
        })
    }

    fn reset_cpu_map(&mut self) {
        self.with(|st| st.cpu_map_resets += 1)
    }
}

impl<const CPUS: usize, const PORTS: usize> EventDelivery for SimGuest<'_, CPUS, PORTS> {
    type Error = Errno;
    fn set_callback(&mut self) -> Result<(), Errno> {
        self.with(|st| {
            st.inject(Fault::Delivery)?;
            st.callback = true;
            Ok(())
        })
    }
    fn register_vcpu_info(&mut self, vcpu: u32) -> Result<(), Errno> {
        self.with(|st| {
            let slot = st
                .vcpu_info
                .get_mut(vcpu as usize)
                .ok_or(Errno(errno::EINVAL))?;
            *slot = true;
            Ok(())
        })
    }
    fn reread_channels(&mut self) -> Result<(), Errno> {
        self.with(|st| {
            st.guest_channels = st.channels();
            Ok(())
        })
    }
}
