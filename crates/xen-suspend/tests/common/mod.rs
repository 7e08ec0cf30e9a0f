//! A simulated guest with many CPUs, VIRQs, IPIs and page-table roots.

#![allow(dead_code, unreachable_pub)]

use oskit_xen_suspend::abi::virq;
use oskit_xen_suspend::events::{EventStorage, Irq, IrqKind};
use oskit_xen_suspend::hal::RootState;
use oskit_xen_suspend::sim::{SimConfig, SimXen};

pub const CPUS: usize = 8;
pub const PORTS: usize = 512;
pub const IRQS: usize = 256;
pub const IPIS: u32 = 5;
pub const CFG: SimConfig = SimConfig {
    nr_pages: 0x8000,
    grant_frames: 4,
    max_grant_frames: 16,
};

pub type Host = SimXen<CPUS, PORTS>;
pub type Events = EventStorage<CPUS, IRQS, PORTS>;

/// A tiny seeded xorshift PRNG.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One binding as the test remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub irq: Irq,
    pub kind: IrqKind,
    pub index: u32,
    pub cpu: u32,
    pub port: u32,
}

/// Per-CPU VIRQs bound on every CPU; global ones on CPU 0 only.
pub const PER_CPU_VIRQS: [u32; 3] = [virq::TIMER, virq::XENOPROF, virq::XENPMU];
pub const GLOBAL_VIRQS: [u32; 3] = [virq::DEBUG, virq::CONSOLE, virq::CON_RING];

/// Binds every VIRQ and IPI of every CPU, returning what was bound.
pub fn bind_all(host: &Host, events: &mut Events) -> Vec<Bound> {
    let mut hv = host.guest();
    let mut ch = events.channels();
    let mut out = Vec::new();
    for cpu in 0..CPUS as u32 {
        let virqs: &[u32] = if cpu == 0 {
            &[PER_CPU_VIRQS, GLOBAL_VIRQS].concat()
        } else {
            &PER_CPU_VIRQS
        };
        for &v in virqs {
            let irq = ch.bind_virq(&mut hv, v, cpu).expect("bind_virq");
            out.push(bound(&ch.info(irq).unwrap(), irq));
        }
        for ipi in 0..IPIS {
            let irq = ch.bind_ipi(&mut hv, ipi, cpu).expect("bind_ipi");
            out.push(bound(&ch.info(irq).unwrap(), irq));
        }
    }
    out
}

fn bound(info: &oskit_xen_suspend::events::IrqInfo, irq: Irq) -> Bound {
    Bound {
        irq,
        kind: info.kind,
        index: info.index,
        cpu: info.cpu,
        port: info.port,
    }
}

/// Roots with a random mix of pinned (live) and unpinned (being built or torn down).
pub fn roots(n: usize, rng: &mut Rng) -> Vec<RootState> {
    (0..n)
        .map(|_| RootState {
            pinned: rng.below(3) != 0,
            save_pinned: false,
        })
        .collect()
}

/// Checks that every remembered binding still has its IRQ, and that raising it at the host
/// arrives on a port the guest maps to that IRQ. Returns the ports now used.
pub fn assert_delivers(host: &Host, events: &mut Events, bindings: &[Bound]) -> Vec<u32> {
    let ch = events.channels();
    let mut ports = Vec::new();
    for b in bindings {
        let info = ch.info(b.irq).expect("binding lost its IRQ");
        assert_eq!((info.kind, info.index, info.cpu), (b.kind, b.index, b.cpu));
        let port = match b.kind {
            IrqKind::Virq => host
                .raise_virq(b.cpu, b.index)
                .unwrap_or_else(|| panic!("VIRQ {} of CPU {} not delivered", b.index, b.cpu)),
            IrqKind::Ipi => {
                let port = info.port;
                assert_eq!(
                    host.send_ipi(port),
                    Some(b.cpu),
                    "IPI {} of CPU {} not delivered on port {port}",
                    b.index,
                    b.cpu
                );
                port
            }
            IrqKind::Free => unreachable!(),
        };
        assert_eq!(
            port, info.port,
            "delivered on a port the guest does not record"
        );
        assert_eq!(
            ch.irq_for_port(port),
            Some(b.irq),
            "port {port} raises the wrong IRQ"
        );
        ports.push(port);
    }
    ports
}
