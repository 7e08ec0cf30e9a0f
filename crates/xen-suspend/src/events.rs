//! The guest's event-channel bookkeeping: which IRQ each port raises and which VIRQ or IPI of
//! which CPU each IRQ is, so every binding can be made again in a new domain.
//!
//! Storage is the caller's ([`EventChannels::new`]) or a fixed-size [`EventStorage`]; nothing
//! allocates.

use crate::abi::{Port, virq::NR_VIRQS};
use crate::error::Error;
use crate::hal::{HalError, Hypervisor};

/// IPIs per CPU the table can hold (reschedule, call-function, ...).
pub const NR_IPIS: usize = 8;

/// VIRQs per CPU.
const VIRQS: usize = NR_VIRQS as usize;

/// An IRQ number: an index into the IRQ table.
pub type Irq = u32;

/// "No IRQ" in the per-CPU and per-port maps.
const NO_IRQ: Irq = Irq::MAX;

/// What an IRQ is bound to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum IrqKind {
    /// A free IRQ slot.
    #[default]
    Free,
    /// VIRQ `index` of `cpu`.
    Virq,
    /// IPI `index` of `cpu`.
    Ipi,
}

/// One IRQ: its binding and current port (0 while it has none: port 0 is never valid).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct IrqInfo {
    /// VIRQ, IPI or free.
    pub kind: IrqKind,
    /// The VIRQ or IPI number.
    pub index: u32,
    /// The CPU it belongs to.
    pub cpu: u32,
    /// Its port in the current domain, 0 when unbound.
    pub port: Port,
}

/// Per-CPU maps from VIRQ and IPI numbers to IRQs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuIrqs {
    virq: [Irq; VIRQS],
    ipi: [Irq; NR_IPIS],
}

impl CpuIrqs {
    /// Nothing bound.
    pub const EMPTY: Self = Self {
        virq: [NO_IRQ; VIRQS],
        ipi: [NO_IRQ; NR_IPIS],
    };
}

impl Default for CpuIrqs {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// Fixed-size storage for an [`EventChannels`] of `CPUS` CPUs, `IRQS` IRQs and `PORTS` ports.
#[derive(Debug, Clone)]
pub struct EventStorage<const CPUS: usize, const IRQS: usize, const PORTS: usize> {
    cpus: [CpuIrqs; CPUS],
    irqs: [IrqInfo; IRQS],
    ports: [Irq; PORTS],
}

impl<const CPUS: usize, const IRQS: usize, const PORTS: usize> EventStorage<CPUS, IRQS, PORTS> {
    /// Empty storage (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            cpus: [CpuIrqs::EMPTY; CPUS],
            irqs: [IrqInfo {
                kind: IrqKind::Free,
                index: 0,
                cpu: 0,
                port: 0,
            }; IRQS],
            ports: [NO_IRQ; PORTS],
        }
    }

    /// The table over this storage; bindings persist in the storage between calls.
    pub fn channels(&mut self) -> EventChannels<'_> {
        EventChannels {
            cpus: &mut self.cpus,
            irqs: &mut self.irqs,
            port_to_irq: &mut self.ports,
        }
    }
}

impl<const CPUS: usize, const IRQS: usize, const PORTS: usize> Default
    for EventStorage<CPUS, IRQS, PORTS>
{
    fn default() -> Self {
        Self::new()
    }
}

/// The guest's event-channel table over borrowed storage.
#[derive(Debug)]
pub struct EventChannels<'a> {
    cpus: &'a mut [CpuIrqs],
    irqs: &'a mut [IrqInfo],
    port_to_irq: &'a mut [Irq],
}

impl<'a> EventChannels<'a> {
    /// An empty table for `cpus.len()` CPUs, `irqs.len()` IRQs and ports `0..ports.len()`
    /// (4096 for the 2-level ABI). Clears the storage.
    pub fn new(cpus: &'a mut [CpuIrqs], irqs: &'a mut [IrqInfo], ports: &'a mut [Irq]) -> Self {
        cpus.fill(CpuIrqs::EMPTY);
        irqs.fill(IrqInfo::default());
        ports.fill(NO_IRQ);
        Self {
            cpus,
            irqs,
            port_to_irq: ports,
        }
    }

    /// Number of CPUs.
    pub fn cpus(&self) -> usize {
        self.cpus.len()
    }

    /// Number of ports the table maps.
    pub fn ports(&self) -> usize {
        self.port_to_irq.len()
    }

    /// Binds VIRQ `virq` of `cpu`: a new IRQ, its port from the hypervisor, unmasked.
    ///
    /// A global VIRQ (see [`crate::abi::virq::is_per_vcpu`]) binds only on CPU 0, as Xen
    /// requires: any other CPU is [`Error::OutOfRange`] without a hypercall. A port the
    /// hypervisor returns that the table cannot take (out of range or 0) is closed again and
    /// refused with [`Error::BadPort`]; so is one the table already maps (that one is left
    /// alone: closing it would kill the binding that owns it). When the unmask fails the port
    /// is closed and the binding rolled back, so the VIRQ can be bound again.
    ///
    /// Calling context: CPU bring-up or driver init, any CPU, interrupts on or off; issues
    /// hypercalls; allocates nothing.
    pub fn bind_virq<H: Hypervisor>(
        &mut self,
        hv: &mut H,
        virq: u32,
        cpu: u32,
    ) -> Result<Irq, Error> {
        if cpu != 0 && !crate::abi::virq::is_per_vcpu(virq) {
            return Err(Error::OutOfRange);
        }
        let slot = self.virq_slot(virq, cpu)?;
        if *slot != NO_IRQ {
            return Err(Error::AlreadyBound);
        }
        let irq = self.alloc_irq()?;
        let port = hv
            .bind_virq(virq, cpu)
            .map_err(|e| Error::Hypervisor(e.errno()))?;
        self.install_new(hv, irq, IrqKind::Virq, virq, cpu, port)?;
        self.cpus[cpu as usize].virq[virq as usize] = irq;
        Ok(irq)
    }

    /// Binds IPI `ipi` (`< NR_IPIS`) of `cpu`: a new IRQ, its port from the hypervisor,
    /// unmasked. Errors and calling context as [`EventChannels::bind_virq`].
    pub fn bind_ipi<H: Hypervisor>(
        &mut self,
        hv: &mut H,
        ipi: u32,
        cpu: u32,
    ) -> Result<Irq, Error> {
        let slot = self.ipi_slot(ipi, cpu)?;
        if *slot != NO_IRQ {
            return Err(Error::AlreadyBound);
        }
        let irq = self.alloc_irq()?;
        let port = hv.bind_ipi(cpu).map_err(|e| Error::Hypervisor(e.errno()))?;
        self.install_new(hv, irq, IrqKind::Ipi, ipi, cpu, port)?;
        self.cpus[cpu as usize].ipi[ipi as usize] = irq;
        Ok(irq)
    }

    /// Unbinds `irq`: masks and closes its port (`EVTCHNOP_close`) and frees the IRQ and its
    /// per-CPU slot, so it is not rebound by the next restore.
    ///
    /// [`Error::OutOfRange`] when `irq` is not bound. When the close fails the port stays
    /// masked and the binding is forgotten anyway (the hypervisor's error is returned): a
    /// port that cannot be closed must not be rebound in a new domain either.
    ///
    /// Calling context: CPU offline (after the CPU stopped taking interrupts) or driver
    /// teardown; issues hypercalls; allocates nothing.
    pub fn unbind<H: Hypervisor>(&mut self, hv: &mut H, irq: Irq) -> Result<(), Error> {
        let info = self.info(irq).ok_or(Error::OutOfRange)?;
        let slot = match info.kind {
            IrqKind::Virq => self.virq_slot(info.index, info.cpu)?,
            IrqKind::Ipi => self.ipi_slot(info.index, info.cpu)?,
            IrqKind::Free => return Err(Error::OutOfRange),
        };
        *slot = NO_IRQ;
        self.irqs[irq as usize] = IrqInfo::default();
        if info.port == 0 {
            // Lost its port in a failed rebind: nothing bound at the hypervisor.
            return Ok(());
        }
        if let Some(p) = self.port_to_irq.get_mut(info.port as usize) {
            *p = NO_IRQ;
        }
        hv.mask(info.port);
        hv.close(info.port)
            .map_err(|e| Error::Hypervisor(e.errno()))
    }

    /// Unbinds every VIRQ and IPI of `cpu` (CPU offline). Every binding is unbound even when
    /// one close fails; returns the first failure. Calling context as
    /// [`EventChannels::unbind`].
    pub fn unbind_cpu<H: Hypervisor>(&mut self, hv: &mut H, cpu: u32) -> Result<(), Error> {
        let per_cpu = *self.cpus.get(cpu as usize).ok_or(Error::OutOfRange)?;
        let mut first = None;
        for &irq in per_cpu.virq.iter().chain(per_cpu.ipi.iter()) {
            if irq != NO_IRQ {
                if let Err(e) = self.unbind(hv, irq) {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// The IRQ an event on `port` raises.
    pub fn irq_for_port(&self, port: Port) -> Option<Irq> {
        match self.port_to_irq.get(port as usize) {
            Some(&irq) if irq != NO_IRQ => Some(irq),
            _ => None,
        }
    }

    /// What `irq` is bound to (`None` when out of range or free).
    pub fn info(&self, irq: Irq) -> Option<IrqInfo> {
        self.irqs
            .get(irq as usize)
            .copied()
            .filter(|i| i.kind != IrqKind::Free)
    }

    /// The IRQ of VIRQ `virq` of `cpu`.
    pub fn virq_irq(&self, virq: u32, cpu: u32) -> Option<Irq> {
        let irq = *self.cpus.get(cpu as usize)?.virq.get(virq as usize)?;
        (irq != NO_IRQ).then_some(irq)
    }

    /// The IRQ of IPI `ipi` of `cpu`.
    pub fn ipi_irq(&self, ipi: u32, cpu: u32) -> Option<Irq> {
        let irq = *self.cpus.get(cpu as usize)?.ipi.get(ipi as usize)?;
        (irq != NO_IRQ).then_some(irq)
    }

    /// Every bound IRQ with its binding.
    pub fn bindings(&self) -> impl Iterator<Item = (Irq, IrqInfo)> + '_ {
        self.irqs
            .iter()
            .enumerate()
            .filter(|(_, i)| i.kind != IrqKind::Free)
            .map(|(irq, i)| (irq as Irq, *i))
    }

    /// After a restore in a new domain: masks every port of the hypervisor's port space
    /// ([`Hypervisor::max_ports`], which may be larger than the table: the new domain's
    /// shared info may carry stale unmasked pending bits anywhere), forgets every IRQ ↔ port
    /// binding, then binds every VIRQ and IPI of every CPU again, records the new port and
    /// unmasks it.
    ///
    /// A binding that fails is left without a port (its IRQ stays allocated, so a later resume
    /// retries it); the others are still made. Returns the first failure.
    ///
    /// Calling context: CPU 0 with interrupts off and the other CPUs quiesced (inside
    /// [`crate::Machine::suspend`]); allocates nothing.
    pub fn resume<H: Hypervisor>(&mut self, hv: &mut H) -> Result<(), Error> {
        // The new port space is not live yet.
        for port in 0..hv.max_ports() {
            hv.mask(port as Port);
        }
        for info in self.irqs.iter_mut() {
            info.port = 0;
        }
        self.port_to_irq.fill(NO_IRQ);

        let mut first = None;
        for cpu in 0..self.cpus.len() {
            let per_cpu = self.cpus[cpu];
            let cpu = cpu as u32;
            for (virq, &irq) in per_cpu.virq.iter().enumerate() {
                if irq == NO_IRQ {
                    continue;
                }
                let bound = hv
                    .bind_virq(virq as u32, cpu)
                    .map_err(|e| Error::Hypervisor(e.errno()))
                    .and_then(|port| {
                        self.install_or_close(hv, irq, IrqKind::Virq, virq as u32, cpu, port)
                    });
                if let Err(e) = bound {
                    first.get_or_insert(e);
                }
            }
            for (ipi, &irq) in per_cpu.ipi.iter().enumerate() {
                if irq == NO_IRQ {
                    continue;
                }
                let bound = hv
                    .bind_ipi(cpu)
                    .map_err(|e| Error::Hypervisor(e.errno()))
                    .and_then(|port| {
                        self.install_or_close(hv, irq, IrqKind::Ipi, ipi as u32, cpu, port)
                    });
                if let Err(e) = bound {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn virq_slot(&mut self, virq: u32, cpu: u32) -> Result<&mut Irq, Error> {
        self.cpus
            .get_mut(cpu as usize)
            .and_then(|c| c.virq.get_mut(virq as usize))
            .ok_or(Error::OutOfRange)
    }

    fn ipi_slot(&mut self, ipi: u32, cpu: u32) -> Result<&mut Irq, Error> {
        self.cpus
            .get_mut(cpu as usize)
            .and_then(|c| c.ipi.get_mut(ipi as usize))
            .ok_or(Error::OutOfRange)
    }

    /// The lowest free IRQ (a scan: [`EventChannels::unbind`] leaves holes anywhere).
    fn alloc_irq(&self) -> Result<Irq, Error> {
        self.irqs
            .iter()
            .position(|i| i.kind == IrqKind::Free)
            .map(|i| i as Irq)
            .ok_or(Error::NoIrq)
    }

    /// [`EventChannels::install`], closing the port at the hypervisor when it fails (unless
    /// another binding owns it). A first bind also frees the IRQ: nothing of it is left.
    fn install_new<H: Hypervisor>(
        &mut self,
        hv: &mut H,
        irq: Irq,
        kind: IrqKind,
        index: u32,
        cpu: u32,
        port: Port,
    ) -> Result<(), Error> {
        let r = self.install_or_close(hv, irq, kind, index, cpu, port);
        if r.is_err() {
            self.irqs[irq as usize] = IrqInfo::default();
        }
        r
    }

    /// [`EventChannels::install`], closing the port at the hypervisor when it fails (unless
    /// another binding owns it), so no port stays bound there that the table does not know.
    fn install_or_close<H: Hypervisor>(
        &mut self,
        hv: &mut H,
        irq: Irq,
        kind: IrqKind,
        index: u32,
        cpu: u32,
        port: Port,
    ) -> Result<(), Error> {
        let owned_by_other = port != 0 && self.irq_for_port(port).is_some();
        let r = self.install(hv, irq, kind, index, cpu, port);
        if r.is_err() && !owned_by_other && port != 0 {
            // Best effort: the first error is the one to report.
            let _ = hv.close(port);
        }
        r
    }

    /// Records `port` (untrusted: it came from the hypervisor) for `irq` and unmasks it.
    fn install<H: Hypervisor>(
        &mut self,
        hv: &mut H,
        irq: Irq,
        kind: IrqKind,
        index: u32,
        cpu: u32,
        port: Port,
    ) -> Result<(), Error> {
        match self.port_to_irq.get_mut(port as usize) {
            Some(slot) if port != 0 && *slot == NO_IRQ => *slot = irq,
            _ => return Err(Error::BadPort(port)),
        }
        self.irqs[irq as usize] = IrqInfo {
            kind,
            index,
            cpu,
            port,
        };
        if let Err(e) = hv.unmask(port) {
            // Not usable: forget the port (a first bind frees the IRQ too; a rebind keeps it
            // without a port, so the next restore retries it).
            self.port_to_irq[port as usize] = NO_IRQ;
            self.irqs[irq as usize].port = 0;
            return Err(Error::Hypervisor(e.errno()));
        }
        Ok(())
    }
}
