//! The software Xen host: one domain (P2M, start info, shared info, event channels, per-vCPU
//! VIRQ/IPI bindings, grant frames) plus the guest-kernel services around a suspend, with
//! fault injection and a checker of the guest at the moment of the suspend hypercall.

use core::cell::RefCell;

use crate::abi::{NR_EVENT_CHANNELS_2L, Port, START_INFO_MAGIC, StartInfo, virq::NR_VIRQS};
use crate::error::{Step, errno};
use crate::hal::{
    Console, Devices, Errno, Freezer, GrantTable, Hypervisor, P2m, StartInfoFrames, StopMachine,
    SuspendResult, Time, XenBus,
};
use zerocopy::FromZeros;

/// Where the model maps shared info (a fixmap slot).
pub const SIM_SHARED_INFO_VA: u64 = 0xffff_ffff_ff5f_e000;
/// PTE flags of a present, writable, accessed, dirty kernel mapping.
const PTE_FLAGS: u64 = 0x63;
/// Largest domain the model builds (frames per domain generation).
const MAX_PAGES: u64 = 0x10_0000;

/// A step of the host or of a guest service that the model can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Fault {
    /// [`Freezer::freeze`].
    Freeze,
    /// [`Devices::suspend`].
    DeviceSuspend,
    /// [`StopMachine::stop_machine`].
    StopMachine,
    /// Pinning a root.
    Pin,
    /// [`GrantTable::suspend`].
    GrantSuspend,
    /// [`Hypervisor::update_va_mapping`] (unmapping shared info).
    UpdateVaMapping,
    /// The suspend hypercall.
    Hypercall,
    /// [`Hypervisor::setup_shared_info`].
    SetupSharedInfo,
    /// [`GrantTable::resume`].
    GrantResume,
    /// Unpinning a root.
    Unpin,
    /// `EVTCHNOP_bind_virq`.
    BindVirq,
    /// `EVTCHNOP_bind_ipi`.
    BindIpi,
    /// `EVTCHNOP_unmask`.
    Unmask,
    /// [`Console::resume`].
    ConsoleResume,
}

impl Fault {
    /// Every fault point.
    pub const ALL: [Fault; 14] = [
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
    ];

    /// The errno the injected failure returns.
    pub const fn errno(self) -> i32 {
        match self {
            Fault::Freeze => errno::EBUSY,
            Fault::DeviceSuspend => errno::EIO,
            Fault::StopMachine | Fault::Pin | Fault::BindVirq | Fault::BindIpi => errno::ENOMEM,
            Fault::GrantSuspend | Fault::GrantResume => errno::ENOSYS,
            Fault::UpdateVaMapping | Fault::SetupSharedInfo | Fault::Unpin | Fault::Unmask => {
                errno::EINVAL
            }
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
        }
    }
}

const NR_FAULTS: usize = Fault::ALL.len();

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
    devices_suspended: bool,
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
            devices_suspended: false,
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
        };
        st.toolstack_channels();
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
        if st.devices_suspended {
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

    fn deliver(&mut self, port: Port) -> Option<Port> {
        let p = &mut self.ports[port as usize];
        p.pending = true;
        if p.masked {
            return None;
        }
        p.pending = false;
        self.delivered += 1;
        Some(port)
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
        if !self.devices_suspended {
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
        // Fresh shared info: nothing masked or pending. Ports the old domain used are taken,
        // so every binding the guest makes lands on a different number.
        for p in self.ports.iter_mut() {
            let old = p.state;
            *p = SimPort::default();
            if matches!(old, PortState::Virq { .. } | PortState::Ipi { .. }) {
                p.state = PortState::Reserved;
            }
        }
        self.ports[0].state = PortState::Reserved;
        self.next_port = 1;
        self.virq_port = [[0; NR_VIRQS as usize]; CPUS];
        self.toolstack_channels();
        self.max_grant_frames = self.next_max_grant_frames;
    }
}

/// A handle on a [`SimXen`] implementing every trait but [`crate::hal::PageTables`] (see
/// [`super::SimPageTables`]). `Copy`: hand one to each field of a [`crate::Machine`].
#[derive(Debug, Clone, Copy)]
pub struct SimGuest<'h, const CPUS: usize, const PORTS: usize> {
    host: &'h SimXen<CPUS, PORTS>,
}

impl<const CPUS: usize, const PORTS: usize> SimGuest<'_, CPUS, PORTS> {
    fn with<R>(&self, f: impl FnOnce(&mut State<CPUS, PORTS>) -> R) -> R {
        f(&mut self.host.st.borrow_mut())
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

impl<const CPUS: usize, const PORTS: usize> Devices for SimGuest<'_, CPUS, PORTS> {
    type Error = Errno;
    fn suspend(&mut self) -> Result<(), Errno> {
        self.with(|st| {
            st.inject(Fault::DeviceSuspend)?;
            st.devices_suspended = true;
            Ok(())
        })
    }
    fn resume(&mut self) {
        self.with(|st| st.devices_suspended = false)
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
        self.with(|st| (st.cpu, st.irqs_enabled, st.others_quiesced) = saved);
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
                p.pending = false;
                st.delivered += 1;
            }
            Ok(())
        })
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
