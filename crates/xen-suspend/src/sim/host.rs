//! The software Xen host: one domain (P2M, start info, shared info, event channels, per-vCPU
//! VIRQ/IPI bindings, grant frames) plus the guest-kernel services around a suspend, with
//! fault injection and a checker of the guest at the moment of the suspend hypercall.

use core::cell::RefCell;

use crate::abi::{NR_EVENT_CHANNELS_2L, Port, START_INFO_MAGIC, StartInfo, virq::NR_VIRQS};
use crate::hal::Errno;
use zerocopy::FromZeros;

use super::faults::{Fault, NR_FAULTS, Violations};

mod guest;

pub use guest::{SimDevice, SimGuest};

/// Devices in the model's device list.
pub const SIM_DEVICES: usize = 4;

/// What a device of the model's list did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceOp {
    /// It was suspended.
    Suspend,
    /// It was resumed.
    Resume,
}

/// The device operations since [`SimXen::set_faults`], in order (the first 64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLog {
    entries: [(u8, DeviceOp); 64],
    len: usize,
}

impl DeviceLog {
    const EMPTY: Self = Self {
        entries: [(0, DeviceOp::Suspend); 64],
        len: 0,
    };

    fn push(&mut self, device: u8, op: DeviceOp) {
        if let Some(e) = self.entries.get_mut(self.len) {
            *e = (device, op);
            self.len += 1;
        }
    }

    /// `(device index, operation)` in the order they happened.
    pub fn as_slice(&self) -> &[(u8, DeviceOp)] {
        &self.entries[..self.len]
    }
}

/// Where the model maps shared info (a fixmap slot).
pub const SIM_SHARED_INFO_VA: u64 = 0xffff_ffff_ff5f_e000;
/// PTE flags of a present, writable, accessed, dirty kernel mapping.
const PTE_FLAGS: u64 = 0x63;
/// Largest domain the model builds (frames per domain generation).
const MAX_PAGES: u64 = 0x10_0000;

/// What the next suspend hypercall does (when the guest passes the checks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SimPlan {
    /// Save, then restore in a new domain (new MFNs, new ports).
    #[default]
    Resume,
    /// The toolstack cancels (or only checkpoints): return "cancelled" in the same domain.
    Cancel,
}

/// One event-channel port of the domain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum PortState {
    /// Unbound.
    #[default]
    Free,
    /// Taken by something the guest's table does not own (port 0, the toolstack's store and
    /// console channels, ports of the previous domain).
    Reserved,
    /// VIRQ `virq` of `vcpu`.
    Virq {
        /// The VIRQ.
        virq: u32,
        /// Its vCPU.
        vcpu: u32,
    },
    /// An IPI port notifying `vcpu`.
    Ipi {
        /// The vCPU.
        vcpu: u32,
    },
}

/// A port's binding and its shared-info bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SimPort {
    /// Binding.
    pub state: PortState,
    /// Mask bit.
    pub masked: bool,
    /// Pending bit.
    pub pending: bool,
}

/// Shape of the simulated domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SimConfig {
    /// Pages of the domain (at most 2^20).
    pub nr_pages: u64,
    /// Grant frames the guest maps.
    pub grant_frames: u32,
    /// Grant frames the domain offers.
    pub max_grant_frames: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nr_pages: 0x4_0000,
            grant_frames: 4,
            max_grant_frames: 32,
        }
    }
}

/// Xenbus connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Bus {
    Connected { generation: u32 },
    Suspended,
}

struct State<const CPUS: usize, const PORTS: usize> {
    cfg: SimConfig,
    // The domain.
    generation: u32,
    mfn_base: u64,
    start_info: StartInfo,
    store_pfn: u64,
    console_pfn: u64,
    shared_info_mfn: u64,
    shared_info_pte: u64,
    shared_info_dummy: bool,
    ports: [SimPort; PORTS],
    next_port: usize,
    virq_port: [[Port; NR_VIRQS as usize]; CPUS],
    max_grant_frames: u32,
    next_max_grant_frames: u32,
    grants_mapped: u32,
    grants_generation: u32,
    roots_total: usize,
    roots_pinned: usize,
    // The vCPUs.
    cpu: u32,
    irqs_enabled: bool,
    others_quiesced: bool,
    kernel_root: bool,
    cpu_map_resets: u32,
    // Guest services.
    frozen: bool,
    devices: [bool; SIM_DEVICES],
    device_log: DeviceLog,
    bus: Bus,
    time_stopped: bool,
    console_generation: u32,
    // Control.
    plan: SimPlan,
    fail_at: [u32; NR_FAULTS],
    calls: [u32; NR_FAULTS],
    fired: Option<Fault>,
    violations: Violations,
    hypercalls: u32,
    delivered: u64,
    // Event delivery (what the guest set up in this domain).
    callback: bool,
    vcpu_info: [bool; CPUS],
    guest_channels: crate::hal::ToolstackChannels,
    strays: u32,
}

/// The software Xen host for `CPUS` vCPUs and `PORTS` event-channel ports.
///
/// Single-threaded (interior mutability through a `RefCell`); everything lives inline, so it
/// can sit on a kernel stack or in a `static` wrapper without an allocator.
pub struct SimXen<const CPUS: usize, const PORTS: usize = NR_EVENT_CHANNELS_2L> {
    st: RefCell<State<CPUS, PORTS>>,
}

impl<const CPUS: usize, const PORTS: usize> core::fmt::Debug for SimXen<CPUS, PORTS> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let st = self.st.borrow();
        f.debug_struct("SimXen")
            .field("generation", &st.generation)
            .field("cpus", &CPUS)
            .field("ports", &PORTS)
            .field("violations", &st.violations)
            .finish_non_exhaustive()
    }
}

const fn mfn_base(generation: u32) -> u64 {
    MAX_PAGES * (generation as u64 + 1)
}

const fn shared_info_mfn(generation: u32) -> u64 {
    0x7f00_0000 + generation as u64
}

impl<const CPUS: usize, const PORTS: usize> SimXen<CPUS, PORTS> {
    /// A freshly built domain: generation 0, every guest service running, shared info and
    /// grant frames mapped, the toolstack's store and console channels on ports 1 and 2.
    ///
    /// # Panics
    /// When `CPUS` is 0, `PORTS < 4`, or `cfg.nr_pages` is outside `4..=2^20` (a test bug).
    pub fn new(cfg: SimConfig) -> Self {
        assert!(
            CPUS > 0 && PORTS >= 4,
            "a domain needs a vCPU and some ports"
        );
        assert!(
            (4..=MAX_PAGES).contains(&cfg.nr_pages),
            "nr_pages out of range"
        );
        let mut start_info = StartInfo::new_zeroed();
        start_info.magic[..START_INFO_MAGIC.len()].copy_from_slice(START_INFO_MAGIC);
        start_info.nr_pages = cfg.nr_pages;
        let store_pfn = cfg.nr_pages - 2;
        let console_pfn = cfg.nr_pages - 1;
        start_info.store_mfn = mfn_base(0) + store_pfn;
        start_info.console_mfn = mfn_base(0) + console_pfn;
        start_info.shared_info = shared_info_mfn(0) << 12;
        let mut ports = [SimPort::default(); PORTS];
        ports[0].state = PortState::Reserved;
        let mut st = State {
            cfg,
            generation: 0,
            mfn_base: mfn_base(0),
            start_info,
            store_pfn,
            console_pfn,
            shared_info_mfn: shared_info_mfn(0),
            shared_info_pte: (shared_info_mfn(0) << 12) | PTE_FLAGS,
            shared_info_dummy: false,
            ports,
            next_port: 1,
            virq_port: [[0; NR_VIRQS as usize]; CPUS],
            max_grant_frames: cfg.max_grant_frames,
            next_max_grant_frames: cfg.max_grant_frames,
            grants_mapped: cfg.grant_frames,
            grants_generation: 0,
            roots_total: 0,
            roots_pinned: 0,
            cpu: if CPUS > 1 { 1 } else { 0 },
            irqs_enabled: true,
            others_quiesced: false,
            kernel_root: false,
            cpu_map_resets: 0,
            frozen: false,
            devices: [false; SIM_DEVICES],
            device_log: DeviceLog::EMPTY,
            bus: Bus::Connected { generation: 0 },
            time_stopped: false,
            console_generation: 0,
            plan: SimPlan::Resume,
            fail_at: [0; NR_FAULTS],
            calls: [0; NR_FAULTS],
            fired: None,
            violations: Violations::NONE,
            hypercalls: 0,
            delivered: 0,
            callback: true,
            vcpu_info: [true; CPUS],
            guest_channels: crate::hal::ToolstackChannels::default(),
            strays: 0,
        };
        st.toolstack_channels();
        st.guest_channels = st.channels();
        Self {
            st: RefCell::new(st),
        }
    }

    /// A handle implementing every guest-service and hypervisor trait against this host.
    pub fn guest(&self) -> SimGuest<'_, CPUS, PORTS> {
        SimGuest { host: self }
    }

    /// What the next suspend hypercalls do.
    pub fn set_plan(&self, plan: SimPlan) {
        self.st.borrow_mut().plan = plan;
    }

    /// Grant frames the next new domain offers (fewer than the guest maps makes grant resume
    /// fail).
    pub fn set_next_max_grant_frames(&self, frames: u32) {
        self.st.borrow_mut().next_max_grant_frames = frames;
    }

    /// Replaces the fault plan: `fault` fails on its `nth` call from now on (1-based; 0 =
    /// never). Counters and the fired record restart.
    pub fn set_faults(&self, plan: &[(Fault, u32)]) {
        let mut st = self.st.borrow_mut();
        st.fail_at = [0; NR_FAULTS];
        for &(fault, nth) in plan {
            st.fail_at[fault as usize] = nth;
        }
        st.calls = [0; NR_FAULTS];
        st.fired = None;
        st.device_log = DeviceLog::EMPTY;
    }

    /// The first injected fault that fired since [`SimXen::set_faults`].
    pub fn fired(&self) -> Option<Fault> {
        self.st.borrow().fired
    }

    /// How often `fault`'s operation was called since [`SimXen::set_faults`].
    pub fn calls(&self, fault: Fault) -> u32 {
        self.st.borrow().calls[fault as usize]
    }

    /// Every violation seen at a suspend hypercall so far.
    pub fn hypercall_violations(&self) -> Violations {
        self.st.borrow().violations
    }

    /// Suspend hypercalls issued.
    pub fn hypercalls(&self) -> u32 {
        self.st.borrow().hypercalls
    }

    /// Domain generation: 0 at build, +1 per restore.
    pub fn generation(&self) -> u32 {
        self.st.borrow().generation
    }

    /// Current MFN of `pfn` (`None` outside the domain).
    pub fn mfn_of(&self, pfn: u64) -> Option<u64> {
        let st = self.st.borrow();
        (pfn < st.cfg.nr_pages).then_some(st.mfn_base + pfn)
    }

    /// A copy of start info as the guest sees it.
    pub fn start_info(&self) -> StartInfo {
        self.st.borrow().start_info
    }

    /// Lets a test scribble on start info (e.g. an MFN the domain does not own).
    pub fn with_start_info<R>(&self, f: impl FnOnce(&mut StartInfo) -> R) -> R {
        f(&mut self.st.borrow_mut().start_info)
    }

    /// Port `port`'s state (`None` out of range).
    pub fn port(&self, port: Port) -> Option<SimPort> {
        self.st.borrow().ports.get(port as usize).copied()
    }

    /// Number of ports bound to a VIRQ or IPI.
    pub fn bound_ports(&self) -> usize {
        self.st
            .borrow()
            .ports
            .iter()
            .filter(|p| matches!(p.state, PortState::Virq { .. } | PortState::Ipi { .. }))
            .count()
    }

    /// Number of roots Xen has pinned.
    pub fn pinned_roots(&self) -> usize {
        self.st.borrow().roots_pinned
    }

    /// Raises VIRQ `virq` on `vcpu`: marks its port pending and returns the port when the
    /// event is delivered (bound and unmasked). Out-of-range arguments deliver nothing.
    pub fn raise_virq(&self, vcpu: u32, virq: u32) -> Option<Port> {
        let mut st = self.st.borrow_mut();
        let port = *st.virq_port.get(vcpu as usize)?.get(virq as usize)?;
        (port != 0).then_some(())?;
        st.deliver(port)
    }

    /// Sends an event on IPI port `port` (`EVTCHNOP_send`): returns the vCPU it is delivered
    /// to when the port is an unmasked IPI port.
    pub fn send_ipi(&self, port: Port) -> Option<u32> {
        let mut st = self.st.borrow_mut();
        let PortState::Ipi { vcpu } = st.ports.get(port as usize)?.state else {
            return None;
        };
        st.deliver(port).map(|_| vcpu)
    }

    /// The device list's operations since [`SimXen::set_faults`] (or the build).
    pub fn device_log(&self) -> DeviceLog {
        self.st.borrow().device_log
    }

    /// Events delivered on ports bound to nothing of the guest's (stale pending bits a mask
    /// sweep missed), so far.
    pub fn strays(&self) -> u32 {
        self.st.borrow().strays
    }

    /// The store and console channels the toolstack bound in the current domain.
    pub fn toolstack_channels(&self) -> crate::hal::ToolstackChannels {
        self.st.borrow().channels()
    }

    /// Events delivered so far (including ones delivered by an unmask).
    pub fn delivered(&self) -> u64 {
        self.st.borrow().delivered
    }

    /// Times the guest reset its CPU map after a restore.
    pub fn cpu_map_resets(&self) -> u32 {
        self.st.borrow().cpu_map_resets
    }

    /// Checks the guest after a suspend returned: tasks thawed, devices, xenbus, time and
    /// console running in the current domain, start info frames and shared info current,
    /// grant frames mapped, no save-pinned root, and every binding of `events` on a port
    /// bound to it, unmasked, in the current domain.
    pub fn audit(
        &self,
        events: &crate::EventChannels<'_>,
        roots: &[crate::hal::RootState],
    ) -> Violations {
        let st = self.st.borrow();
        let mut v = Violations::NONE;
        if st.frozen {
            v |= Violations::TASKS_FROZEN;
        }
        if st.devices.iter().any(|&d| d) {
            v |= Violations::DEVICES_SUSPENDED;
        }
        if st.bus
            != (Bus::Connected {
                generation: st.generation,
            })
        {
            v |= Violations::XENBUS_STALE;
        }
        if st.time_stopped {
            v |= Violations::TIME_STOPPED;
        }
        if st.console_generation != st.generation {
            v |= Violations::CONSOLE_STALE;
        }
        if st.start_info.store_mfn != st.mfn_base + st.store_pfn
            || st.start_info.console_mfn != st.mfn_base + st.console_pfn
        {
            v |= Violations::FRAME_STALE;
        }
        if st.shared_info_dummy || st.shared_info_pte != (st.shared_info_mfn << 12) | PTE_FLAGS {
            v |= Violations::SHARED_INFO_STALE;
        }
        if st.grants_generation != st.generation || st.grants_mapped != st.cfg.grant_frames {
            v |= Violations::GRANTS_STALE;
        }
        let pinned = roots.iter().filter(|r| r.pinned).count();
        if roots.iter().any(|r| r.save_pinned) || pinned != st.roots_pinned {
            v |= Violations::ROOT_SAVE_PINNED;
        }
        if !st.irqs_enabled || st.others_quiesced {
            v |= Violations::CPUS_STOPPED;
        }
        if !st.callback || !st.vcpu_info.iter().all(|&r| r) || st.guest_channels != st.channels() {
            v |= Violations::DELIVERY_STALE;
        }
        if st.strays != 0 {
            v |= Violations::STRAY_EVENT;
        }
        let host_bound = st
            .ports
            .iter()
            .filter(|p| matches!(p.state, PortState::Virq { .. } | PortState::Ipi { .. }))
            .count();
        let guest_bound = events.bindings().filter(|(_, i)| i.port != 0).count();
        if host_bound > guest_bound {
            v |= Violations::PORT_LEAK;
        }
        for (_, info) in events.bindings() {
            let expected = match info.kind {
                crate::events::IrqKind::Virq => PortState::Virq {
                    virq: info.index,
                    vcpu: info.cpu,
                },
                crate::events::IrqKind::Ipi => PortState::Ipi { vcpu: info.cpu },
                crate::events::IrqKind::Free => continue,
            };
            match st.ports.get(info.port as usize) {
                Some(p) if info.port != 0 && p.state == expected && !p.masked => {}
                _ => v |= Violations::BINDING_STALE,
            }
        }
        v
    }
}

impl<const CPUS: usize, const PORTS: usize> State<CPUS, PORTS> {
    fn inject(&mut self, fault: Fault) -> Result<(), Errno> {
        let i = fault as usize;
        self.calls[i] = self.calls[i].saturating_add(1);
        if self.fail_at[i] != 0 && self.calls[i] == self.fail_at[i] {
            self.fired.get_or_insert(fault);
            return Err(Errno(fault.errno()));
        }
        Ok(())
    }

    fn alloc_port(&mut self) -> Option<Port> {
        let found = (self.next_port..PORTS)
            .chain(1..self.next_port.min(PORTS))
            .find(|&p| self.ports[p].state == PortState::Free)?;
        self.next_port = found + 1;
        Some(found as Port)
    }

    /// The toolstack binds the store and console channels of a new domain.
    fn toolstack_channels(&mut self) {
        let store = self.alloc_port().unwrap_or(0);
        self.ports[store as usize].state = PortState::Reserved;
        let console = self.alloc_port().unwrap_or(0);
        self.ports[console as usize].state = PortState::Reserved;
        self.start_info.store_evtchn = store;
        self.start_info.console_evtchn = console;
    }

    fn channels(&self) -> crate::hal::ToolstackChannels {
        crate::hal::ToolstackChannels {
            store: self.start_info.store_evtchn,
            console: self.start_info.console_evtchn,
        }
    }

    /// Marks `port` pending and delivers it when it is unmasked and event delivery reaches
    /// its vCPU (callback set, `vcpu_info` registered).
    fn deliver(&mut self, port: Port) -> Option<Port> {
        let p = &mut self.ports[port as usize];
        p.pending = true;
        if p.masked {
            return None;
        }
        let vcpu = match p.state {
            PortState::Virq { vcpu, .. } | PortState::Ipi { vcpu } => vcpu,
            PortState::Free | PortState::Reserved => 0,
        };
        if !self.callback || !self.vcpu_info.get(vcpu as usize).copied().unwrap_or(false) {
            return None;
        }
        let p = &mut self.ports[port as usize];
        p.pending = false;
        if matches!(p.state, PortState::Virq { .. } | PortState::Ipi { .. }) {
            self.delivered += 1;
        } else {
            self.strays += 1;
        }
        Some(port)
    }

    /// Interrupts came back on: every pending, unmasked port is delivered.
    fn deliver_unmasked(&mut self) {
        for port in 0..PORTS {
            let p = self.ports[port];
            if p.pending && !p.masked {
                self.deliver(port as Port);
            }
        }
    }

    /// What Xen and the toolstack would refuse to save.
    fn check_guest(&self) -> Violations {
        let mut v = Violations::NONE;
        if self.cpu != 0 {
            v |= Violations::NOT_CPU0;
        }
        if self.irqs_enabled {
            v |= Violations::IRQS_ENABLED;
        }
        if CPUS > 1 && !self.others_quiesced {
            v |= Violations::CPUS_RUNNING;
        }
        if self.roots_pinned != self.roots_total {
            v |= Violations::ROOT_UNPINNED;
        }
        if !self.kernel_root {
            v |= Violations::USER_ROOT_LOADED;
        }
        if self.start_info.store_mfn != self.store_pfn {
            v |= Violations::STORE_NOT_CANONICAL;
        }
        if self.start_info.console_mfn != self.console_pfn {
            v |= Violations::CONSOLE_NOT_CANONICAL;
        }
        if self.shared_info_pte != 0 {
            v |= Violations::SHARED_INFO_MAPPED;
        }
        if !self.shared_info_dummy {
            v |= Violations::SHARED_INFO_IN_USE;
        }
        if self.grants_mapped != 0 {
            v |= Violations::GRANTS_MAPPED;
        }
        if !self.frozen {
            v |= Violations::TASKS_RUNNING;
        }
        if !self.devices.iter().all(|&d| d) {
            v |= Violations::DEVICES_RUNNING;
        }
        if self.bus != Bus::Suspended {
            v |= Violations::XENBUS_RUNNING;
        }
        if !self.time_stopped {
            v |= Violations::TIME_RUNNING;
        }
        v
    }

    /// Restore into a new domain: new MFNs, new shared info, new ports for everything.
    fn new_domain(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.mfn_base = mfn_base(self.generation);
        self.shared_info_mfn = shared_info_mfn(self.generation);
        // The toolstack turns the saved PFNs into the new MFNs.
        self.start_info.store_mfn += self.mfn_base;
        self.start_info.console_mfn += self.mfn_base;
        self.start_info.shared_info = self.shared_info_mfn << 12;
        // Ports the old domain used are taken, so every binding the guest makes lands on a
        // different number. Shared info is not fresh: the old domain's ports and the last port
        // of the space carry stale pending, unmasked bits, so a guest that does not mask the
        // whole port space before interrupts come back gets stray events.
        for p in self.ports.iter_mut() {
            let old = p.state;
            *p = SimPort::default();
            if matches!(old, PortState::Virq { .. } | PortState::Ipi { .. }) {
                p.state = PortState::Reserved;
                p.pending = true;
            }
        }
        self.ports[0].state = PortState::Reserved;
        self.ports[PORTS - 1].pending = true;
        // The old store and console channels stay taken too: the toolstack's new ones move.
        for old in [self.start_info.store_evtchn, self.start_info.console_evtchn] {
            if let Some(p) = self.ports.get_mut(old as usize) {
                p.state = PortState::Reserved;
            }
        }
        // A new domain delivers nothing until the guest sets delivery up again.
        self.callback = false;
        self.vcpu_info = [false; CPUS];
        self.next_port = 1;
        self.virq_port = [[0; NR_VIRQS as usize]; CPUS];
        self.toolstack_channels();
        self.max_grant_frames = self.next_max_grant_frames;
    }
}
