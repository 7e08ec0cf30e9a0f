//! The software host catches what a careless guest or a broken hypervisor does: leaked ports,
//! a skipped or short mask sweep, skipped event-delivery set-up, a failed first unmask, a
//! global VIRQ off vCPU 0, devices not rolled back in reverse order.

use std::cell::Cell;

use oskit_xen_suspend::abi::{Port, virq};
use oskit_xen_suspend::error::errno;
use oskit_xen_suspend::hal::{
    Errno, EventDelivery, Hypervisor, Platform, RootState, StartInfoFrames, SuspendResult,
};
use oskit_xen_suspend::sim::{
    DeviceOp, Fault, SimConfig, SimGuest, SimPageTables, SimXen, Violations,
};
use oskit_xen_suspend::{Error, EventStorage, Machine, Outcome, Step};

type Host = SimXen<2, 256>;
/// The guest's table maps fewer ports than the hypervisor's space.
type Events = EventStorage<2, 16, 64>;

/// What the wrapped hypervisor gets wrong.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bug {
    /// Nothing: plain delegation.
    None,
    /// Every IPI bind binds a second port and forgets the first.
    LeakIpi,
    /// `mask` does nothing.
    NoMask,
    /// Reports the guest table's port count as the port space (the old, short sweep).
    ShortSpace,
    /// Event delivery is never set up again.
    NoDelivery,
}

#[derive(Clone, Copy)]
struct Wrapped<'h> {
    guest: SimGuest<'h, 2, 256>,
    bug: &'h Cell<Bug>,
}

impl Hypervisor for Wrapped<'_> {
    type Error = Errno;
    fn bind_virq(&mut self, virq: u32, vcpu: u32) -> Result<Port, Errno> {
        self.guest.bind_virq(virq, vcpu)
    }
    fn bind_ipi(&mut self, vcpu: u32) -> Result<Port, Errno> {
        if self.bug.get() == Bug::LeakIpi {
            self.guest.bind_ipi(vcpu)?;
        }
        self.guest.bind_ipi(vcpu)
    }
    fn mask(&mut self, port: Port) {
        if self.bug.get() != Bug::NoMask {
            self.guest.mask(port)
        }
    }
    fn unmask(&mut self, port: Port) -> Result<(), Errno> {
        self.guest.unmask(port)
    }
    fn close(&mut self, port: Port) -> Result<(), Errno> {
        self.guest.close(port)
    }
    fn max_ports(&self) -> usize {
        if self.bug.get() == Bug::ShortSpace {
            64
        } else {
            self.guest.max_ports()
        }
    }
    fn suspend(&mut self) -> Result<SuspendResult, Errno> {
        Hypervisor::suspend(&mut self.guest)
    }
    fn update_va_mapping(&mut self, va: u64, pte: u64, flags: u64) -> Result<(), Errno> {
        self.guest.update_va_mapping(va, pte, flags)
    }
    fn start_info_frames(&self) -> StartInfoFrames {
        self.guest.start_info_frames()
    }
    fn set_start_info_frames(&mut self, frames: StartInfoFrames) {
        self.guest.set_start_info_frames(frames)
    }
    fn shared_info_va(&self) -> u64 {
        self.guest.shared_info_va()
    }
    fn use_dummy_shared_info(&mut self) {
        self.guest.use_dummy_shared_info()
    }
    fn setup_shared_info(&mut self) -> Result<(), Errno> {
        self.guest.setup_shared_info()
    }
}

impl EventDelivery for Wrapped<'_> {
    type Error = Errno;
    fn set_callback(&mut self) -> Result<(), Errno> {
        if self.bug.get() == Bug::NoDelivery {
            return Ok(());
        }
        self.guest.set_callback()
    }
    fn register_vcpu_info(&mut self, vcpu: u32) -> Result<(), Errno> {
        if self.bug.get() == Bug::NoDelivery {
            return Ok(());
        }
        self.guest.register_vcpu_info(vcpu)
    }
    fn reread_channels(&mut self) -> Result<(), Errno> {
        if self.bug.get() == Bug::NoDelivery {
            return Ok(());
        }
        self.guest.reread_channels()
    }
}

struct Wrap<'h, 'p, 'r>(std::marker::PhantomData<&'p mut SimPageTables<'h, 'r, 2, 256>>);

impl<'h, 'p, 'r> Platform for Wrap<'h, 'p, 'r> {
    type Freezer = SimGuest<'h, 2, 256>;
    type Devices = SimGuest<'h, 2, 256>;
    type XenBus = SimGuest<'h, 2, 256>;
    type Stop = SimGuest<'h, 2, 256>;
    type P2m = SimGuest<'h, 2, 256>;
    type PageTables = &'p mut SimPageTables<'h, 'r, 2, 256>;
    type Grants = SimGuest<'h, 2, 256>;
    type Time = SimGuest<'h, 2, 256>;
    type Console = SimGuest<'h, 2, 256>;
    type Hypervisor = Wrapped<'h>;
}

/// A guest with a timer VIRQ and two IPIs per CPU and the console VIRQ on CPU 0.
fn bound_guest(host: &Host, events: &mut Events) {
    let mut hv = host.guest();
    let mut ch = events.channels();
    for cpu in 0..2 {
        ch.bind_virq(&mut hv, virq::TIMER, cpu).unwrap();
        ch.bind_ipi(&mut hv, 0, cpu).unwrap();
        ch.bind_ipi(&mut hv, 1, cpu).unwrap();
    }
    ch.bind_virq(&mut hv, virq::CONSOLE, 0).unwrap();
}

/// Suspends (restoring into a new domain) through a hypervisor with `bug` during the cycle.
fn cycle_with(bug: Bug) -> (Box<Host>, Box<Events>, Result<Outcome, Error>, Violations) {
    let host = Box::new(Host::new(SimConfig::default()));
    let mut events = Box::new(Events::new());
    bound_guest(&host, &mut events);
    let cell = Cell::new(bug);
    let mut roots = [RootState::default(); 3];
    let guest = host.guest();
    let mut pt = SimPageTables::new(guest, &mut roots);
    let wrapped = Wrapped { guest, bug: &cell };
    let mut m = Machine::<Wrap<'_, '_, '_>> {
        freezer: guest,
        devices: guest,
        xenbus: guest,
        stop: guest,
        p2m: guest,
        page_tables: &mut pt,
        grants: guest,
        time: guest,
        console: guest,
        hypervisor: wrapped,
    };
    let r = m.suspend(&mut events.channels());
    let audit = host.audit(&events.channels(), &roots);
    (host, events, r, audit)
}

#[test]
fn a_correct_hypervisor_cycle_audits_clean() {
    let (host, _, r, audit) = cycle_with(Bug::None);
    assert_eq!(r, Ok(Outcome::Resumed));
    assert_eq!(
        audit,
        Violations::NONE,
        "{:?}",
        audit.names().collect::<Vec<_>>()
    );
    assert_eq!(host.strays(), 0);
    assert_eq!(host.bound_ports(), 7);
}

#[test]
fn audit_catches_a_hypervisor_that_leaks_a_port_per_ipi_rebind() {
    let (host, events, r, audit) = cycle_with(Bug::LeakIpi);
    assert_eq!(r, Ok(Outcome::Resumed));
    assert_eq!(host.bound_ports(), 11, "4 IPIs rebound, 4 ports leaked");
    let mut events = events;
    assert_eq!(events.channels().bindings().count(), 7);
    assert_eq!(
        audit,
        Violations::PORT_LEAK,
        "{:?}",
        audit.names().collect::<Vec<_>>()
    );
}

#[test]
fn a_mask_sweep_that_does_nothing_lets_stale_events_through() {
    let (host, _, r, audit) = cycle_with(Bug::NoMask);
    assert_eq!(r, Ok(Outcome::Resumed));
    assert!(host.strays() > 0);
    assert_eq!(
        audit,
        Violations::STRAY_EVENT,
        "{:?}",
        audit.names().collect::<Vec<_>>()
    );
}

#[test]
fn a_sweep_of_only_the_guests_table_misses_the_rest_of_the_port_space() {
    // The old sweep covered the table's 64 ports; the host's stale bit on port 255 stays
    // unmasked and arrives once interrupts are back.
    let (host, _, r, audit) = cycle_with(Bug::ShortSpace);
    assert_eq!(r, Ok(Outcome::Resumed));
    assert_eq!(host.strays(), 1);
    assert_eq!(audit, Violations::STRAY_EVENT);
}

#[test]
fn a_new_domain_delivers_nothing_until_event_delivery_is_set_up_again() {
    let (host, mut events, r, audit) = cycle_with(Bug::NoDelivery);
    assert_eq!(r, Ok(Outcome::Resumed));
    assert_eq!(
        audit,
        Violations::DELIVERY_STALE,
        "{:?}",
        audit.names().collect::<Vec<_>>()
    );
    let ch = events.channels();
    let timer = ch.virq_irq(virq::TIMER, 1).unwrap();
    let port = ch.info(timer).unwrap().port;
    assert_eq!(
        host.raise_virq(1, virq::TIMER),
        None,
        "no callback: nothing arrives"
    );
    assert!(host.port(port).unwrap().pending, "the event waits, pending");
}

#[test]
fn the_store_and_console_channels_are_reread_in_the_new_domain() {
    let (host, _, r, audit) = cycle_with(Bug::None);
    assert_eq!(r, Ok(Outcome::Resumed));
    assert!(audit.is_empty());
    let before = Host::new(SimConfig::default()).toolstack_channels();
    assert_ne!(
        host.toolstack_channels(),
        before,
        "the toolstack moved them"
    );
}

#[test]
fn a_failed_unmask_on_first_bind_rolls_back_and_the_virq_binds_again() {
    let host = Host::new(SimConfig::default());
    let mut events = Events::new();
    let mut hv = host.guest();
    let mut ch = events.channels();
    host.set_faults(&[(Fault::Unmask, 1)]);
    assert_eq!(
        ch.bind_virq(&mut hv, virq::TIMER, 1),
        Err(Error::Hypervisor(errno::EINVAL))
    );
    assert_eq!(ch.bindings().count(), 0, "nothing recorded");
    assert_eq!(host.bound_ports(), 0, "the port was closed again");
    let irq = ch.bind_virq(&mut hv, virq::TIMER, 1).expect("binds again");
    assert_eq!(irq, 0, "the IRQ was freed");
    let port = ch.info(irq).unwrap().port;
    assert_eq!(host.raise_virq(1, virq::TIMER), Some(port));
    assert_eq!(host.audit(&ch, &[]), Violations::NONE);
}

#[test]
fn the_host_refuses_a_global_virq_off_vcpu_0_as_xen_does() {
    let host = Host::new(SimConfig::default());
    let mut hv = host.guest();
    for v in [virq::CONSOLE, virq::DOM_EXC, virq::CON_RING, virq::ARCH_0] {
        assert_eq!(hv.bind_virq(v, 1), Err(Errno(errno::EINVAL)), "VIRQ {v}");
    }
    assert!(hv.bind_virq(virq::CONSOLE, 0).is_ok());
    assert!(
        hv.bind_virq(virq::DEBUG, 1).is_ok(),
        "VIRQ_DEBUG is per-vCPU"
    );
}

#[test]
fn an_offlined_cpu_is_unbound_and_not_rebound_by_a_restore() {
    let host = Box::new(Host::new(SimConfig::default()));
    let mut events = Box::new(Events::new());
    bound_guest(&host, &mut events);
    let mut hv = host.guest();
    assert_eq!(host.bound_ports(), 7);
    events.channels().unbind_cpu(&mut hv, 1).unwrap();
    assert_eq!(host.bound_ports(), 4, "CPU 1's timer and IPIs closed");
    let ch = events.channels();
    assert_eq!(ch.virq_irq(virq::TIMER, 1), None);
    assert_eq!(ch.ipi_irq(0, 1), None);
    assert_eq!(ch.bindings().count(), 4);
    assert_eq!(
        events.channels().unbind(&mut hv, 15),
        Err(Error::OutOfRange),
        "not bound"
    );

    let mut roots = [RootState::default(); 2];
    let guest = host.guest();
    let mut pt = SimPageTables::new(guest, &mut roots);
    assert_eq!(
        pt.machine(guest).suspend(&mut events.channels()),
        Ok(Outcome::Resumed)
    );
    assert_eq!(host.bound_ports(), 4, "only CPU 0's bindings come back");
    assert_eq!(host.audit(&events.channels(), &roots), Violations::NONE);
    // CPU 1 comes back online: its bindings are made afresh, on the freed IRQs.
    let mut ch = events.channels();
    let irq = ch.bind_virq(&mut hv, virq::TIMER, 1).unwrap();
    assert!(irq < 7, "a freed IRQ is reused");
    assert_eq!(
        host.raise_virq(1, virq::TIMER),
        Some(ch.info(irq).unwrap().port)
    );
}

#[test]
fn a_failing_device_rolls_the_others_back_in_reverse_order() {
    let host = Box::new(Host::new(SimConfig::default()));
    let mut events = Box::new(Events::new());
    bound_guest(&host, &mut events);
    let mut roots = [RootState::default(); 2];
    // The list suspends from its last device to its first: 3 and 2 succeed, 1 fails.
    host.set_faults(&[(Fault::DeviceSuspend, 3)]);
    let guest = host.guest();
    let mut pt = SimPageTables::new(guest, &mut roots);
    let r = pt.machine(guest).suspend(&mut events.channels());
    assert_eq!(
        r,
        Err(Error::Suspend {
            step: Step::DeviceSuspend,
            errno: errno::EIO,
            outcome: Outcome::NotSuspended
        })
    );
    assert_eq!(
        host.device_log().as_slice(),
        [
            (3, DeviceOp::Suspend),
            (2, DeviceOp::Suspend),
            (2, DeviceOp::Resume),
            (3, DeviceOp::Resume),
        ]
    );
    assert_eq!(host.audit(&events.channels(), &roots), Violations::NONE);

    // A clean cycle suspends last to first and resumes first to last.
    host.set_faults(&[]);
    let mut pt = SimPageTables::new(guest, &mut roots);
    assert_eq!(
        pt.machine(guest).suspend(&mut events.channels()),
        Ok(Outcome::Resumed)
    );
    let ops: Vec<_> = host.device_log().as_slice().to_vec();
    assert_eq!(
        ops,
        [3, 2, 1, 0]
            .map(|d| (d, DeviceOp::Suspend))
            .into_iter()
            .chain([0, 1, 2, 3].map(|d| (d, DeviceOp::Resume)))
            .collect::<Vec<_>>()
    );
}
