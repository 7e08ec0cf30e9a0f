//! The guest's event-channel table against a hypervisor that returns hostile ports.

use oskit_xen_suspend::hal::{Errno, Hypervisor, StartInfoFrames, SuspendResult};
use oskit_xen_suspend::{Error, EventStorage};

/// Hands out the ports in `ports`, in order.
struct Hostile {
    ports: Vec<u32>,
    unmasked: Vec<u32>,
    closed: Vec<u32>,
}

impl Hypervisor for Hostile {
    type Error = Errno;
    fn bind_virq(&mut self, _: u32, _: u32) -> Result<u32, Errno> {
        Ok(self.ports.remove(0))
    }
    fn bind_ipi(&mut self, _: u32) -> Result<u32, Errno> {
        Ok(self.ports.remove(0))
    }
    fn mask(&mut self, _: u32) {}
    fn close(&mut self, port: u32) -> Result<(), Errno> {
        self.closed.push(port);
        Ok(())
    }
    fn max_ports(&self) -> usize {
        16
    }
    fn unmask(&mut self, port: u32) -> Result<(), Errno> {
        self.unmasked.push(port);
        Ok(())
    }
    fn suspend(&mut self) -> Result<SuspendResult, Errno> {
        Err(Errno(38))
    }
    fn update_va_mapping(&mut self, _: u64, _: u64, _: u64) -> Result<(), Errno> {
        Err(Errno(38))
    }
    fn start_info_frames(&self) -> StartInfoFrames {
        StartInfoFrames::default()
    }
    fn set_start_info_frames(&mut self, _: StartInfoFrames) {}
    fn shared_info_va(&self) -> u64 {
        0
    }
    fn use_dummy_shared_info(&mut self) {}
    fn setup_shared_info(&mut self) -> Result<(), Errno> {
        Ok(())
    }
}

#[test]
fn ports_out_of_range_zero_or_in_use_are_refused() {
    let mut storage = EventStorage::<2, 8, 16>::new();
    let mut ch = storage.channels();
    let mut hv = Hostile {
        ports: vec![5, 16, 0, 5, u32::MAX, 6],
        unmasked: vec![],
        closed: vec![],
    };
    let first = ch.bind_virq(&mut hv, 0, 0).unwrap();
    assert_eq!(ch.irq_for_port(5), Some(first));
    assert_eq!(ch.bind_virq(&mut hv, 1, 0), Err(Error::BadPort(16)));
    assert_eq!(ch.bind_ipi(&mut hv, 0, 1), Err(Error::BadPort(0)));
    assert_eq!(ch.bind_ipi(&mut hv, 1, 1), Err(Error::BadPort(5)));
    assert_eq!(ch.bind_ipi(&mut hv, 2, 1), Err(Error::BadPort(u32::MAX)));
    // Refused bindings leave no trace: the next good port works and gets the next IRQ.
    let second = ch.bind_ipi(&mut hv, 2, 1).unwrap();
    assert_eq!(ch.irq_for_port(6), Some(second));
    assert_eq!(ch.bindings().count(), 2);
    assert_eq!(hv.unmasked, [5, 6], "only accepted ports are unmasked");
    // Refused ports are closed again, except 0 (never valid) and 5 (the first binding's).
    assert_eq!(hv.closed, [16, u32::MAX]);
}

#[test]
fn argument_errors_and_a_full_table() {
    let mut storage = EventStorage::<2, 2, 16>::new();
    let mut ch = storage.channels();
    let mut hv = Hostile {
        ports: (1..16).collect(),
        unmasked: vec![],
        closed: vec![],
    };
    assert_eq!(ch.bind_virq(&mut hv, 24, 0), Err(Error::OutOfRange));
    assert_eq!(ch.bind_virq(&mut hv, 0, 2), Err(Error::OutOfRange));
    assert_eq!(ch.bind_ipi(&mut hv, 8, 0), Err(Error::OutOfRange));
    ch.bind_virq(&mut hv, 0, 0).unwrap();
    assert_eq!(ch.bind_virq(&mut hv, 0, 0), Err(Error::AlreadyBound));
    ch.bind_ipi(&mut hv, 0, 1).unwrap();
    assert_eq!(ch.bind_ipi(&mut hv, 1, 1), Err(Error::NoIrq));
    assert_eq!(Error::NoIrq.errno(), 28);
}

#[test]
fn resume_with_a_hostile_port_keeps_the_other_bindings() {
    let mut storage = EventStorage::<1, 4, 16>::new();
    let mut ch = storage.channels();
    let mut hv = Hostile {
        ports: vec![1, 2, 3],
        unmasked: vec![],
        closed: vec![],
    };
    let a = ch.bind_virq(&mut hv, 0, 0).unwrap();
    let b = ch.bind_virq(&mut hv, 1, 0).unwrap();
    let c = ch.bind_ipi(&mut hv, 0, 0).unwrap();
    // The new domain hands out 9, then a duplicate 9, then 4.
    hv.ports = vec![9, 9, 4];
    assert_eq!(ch.resume(&mut hv), Err(Error::BadPort(9)));
    assert_eq!(ch.info(a).unwrap().port, 9);
    assert_eq!(ch.info(b).unwrap().port, 0, "refused: left without a port");
    assert_eq!(ch.info(c).unwrap().port, 4);
    assert_eq!(ch.irq_for_port(1), None, "old ports forgotten");
    assert_eq!(ch.irq_for_port(9), Some(a));
    assert_eq!(ch.irq_for_port(4), Some(c));
    assert!(
        hv.closed.is_empty(),
        "the duplicate 9 belongs to a binding: not closed"
    );
}

#[test]
fn a_global_virq_binds_only_on_cpu_0_without_asking_the_hypervisor() {
    use oskit_xen_suspend::abi::virq;
    let mut storage = EventStorage::<2, 8, 16>::new();
    let mut ch = storage.channels();
    // No ports to hand out: a hypercall would panic the test.
    let mut hv = Hostile {
        ports: vec![],
        unmasked: vec![],
        closed: vec![],
    };
    for v in [virq::CONSOLE, virq::CON_RING, virq::DOM_EXC, virq::ARCH_0] {
        assert_eq!(
            ch.bind_virq(&mut hv, v, 1),
            Err(Error::OutOfRange),
            "VIRQ {v}"
        );
    }
    hv.ports = vec![3, 4];
    ch.bind_virq(&mut hv, virq::CONSOLE, 0).unwrap();
    // Per-vCPU ones ("V." in xen.h) bind anywhere, VIRQ_DEBUG included.
    ch.bind_virq(&mut hv, virq::DEBUG, 1).unwrap();
}
