//! Software model of the hardware: a KVM host as the guest sees it.
//!
//! [`SimHost`] plays KVM for `CPUS` vCPUs: it answers CPUID, keeps each vCPU's async-PF MSRs
//! (refusing what KVM refuses), and injects "not present" and "page ready" events into a
//! guest's [`ApfCpu`] in any order the caller likes: ready before not present, duplicates,
//! unknown tokens, wake-all. Each injection returns what the guest must then run: its
//! page-fault handler with a CR2, or its page-ready interrupt handler. [`SimHost::poke`]
//! writes arbitrary bytes into the shared area, as a hostile host could.
//!
//! It behaves as KVM documents (`msr.rst`): a host offering `ASYNC_PF_INT` (KVM >= 5.8)
//! accepts an enable without `DELIVERY_AS_INT` and then delivers nothing; an enable with it
//! queues a page-ready "wake all" (token `0xffffffff`), which [`SimHost::deliver_queued`]
//! delivers and which goes before any later page ready of that vCPU.
//!
//! Physical addresses are the guest's virtual ones here: enable with
//! `cpu.area_addr() as u64`. `no_std`, no allocation: fit for a `static`.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::{
    abi::{
        EN_DELIVERY_AS_INT, EN_ENABLED, EN_FLAGS_MASK, REASON_PAGE_NOT_PRESENT, REASON_PAGE_READY,
        TOKEN_WAKE_ALL,
    },
    hal::{ApfHardware, KvmFeatures},
    percpu::ApfCpu,
};

/// What the simulated host refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimError {
    /// An MSR access where the MSR does not exist (bare metal, or no async PF): #GP.
    GeneralProtection,
    /// The enable value sets reserved bits: KVM fails the WRMSR (#GP).
    Rejected,
    /// The vCPU index is out of range.
    NoSuchVcpu,
    /// Async page faults are not enabled on the vCPU.
    NotEnabled,
    /// The guest registered another area than the one given for injection.
    WrongArea,
    /// Page ready (interrupt protocol) while the previous token is still in the area, or while
    /// the wake-all queued by the enable is not delivered yet: KVM waits for the guest to
    /// clear the token and write ACK, and delivers in order.
    SlotBusy,
}

impl SimError {
    /// The Linux errno closest to this error (positive value).
    pub fn errno(&self) -> i32 {
        match self {
            Self::GeneralProtection | Self::Rejected => 5, // EIO
            Self::NoSuchVcpu => 19,                        // ENODEV
            Self::NotEnabled => 22,                        // EINVAL
            Self::WrongArea => 14,                         // EFAULT
            Self::SlotBusy => 16,                          // EBUSY
        }
    }
}

/// How the guest must receive an injected event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inject {
    /// Run the page-fault handler with this CR2.
    PageFault {
        /// The value of CR2: the token.
        cr2: u64,
    },
    /// Run the page-ready interrupt handler (vector `vector`).
    Interrupt {
        /// The vector the guest programmed.
        vector: u8,
    },
}

#[derive(Debug)]
struct Vcpu {
    en: AtomicU64,
    vector: AtomicU64,
    acks: AtomicU64,
    /// Writes of `MSR_KVM_ASYNC_PF_EN` the host accepted.
    en_writes: AtomicU64,
    /// The wake-all the last enable queued, not delivered yet.
    wake_all_queued: AtomicBool,
}

impl Vcpu {
    const fn new() -> Self {
        Self {
            en: AtomicU64::new(0),
            vector: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            en_writes: AtomicU64::new(0),
            wake_all_queued: AtomicBool::new(false),
        }
    }
}

/// A simulated host: KVM with some features and `CPUS` vCPUs, or bare metal.
#[derive(Debug)]
pub struct SimHost<const CPUS: usize = 1> {
    features: Option<KvmFeatures>,
    vcpus: [Vcpu; CPUS],
}

impl<const CPUS: usize> SimHost<CPUS> {
    /// Bare metal: no hypervisor answers, and KVM's MSRs do not exist.
    pub const fn bare_metal() -> Self {
        Self {
            features: None,
            vcpus: [const { Vcpu::new() }; CPUS],
        }
    }

    /// A KVM host offering `features` (bits of [`KvmFeatures`]). With `ASYNC_PF_INT` it is a
    /// modern KVM that insists on interrupt delivery; with only `ASYNC_PF` an old one.
    pub const fn kvm(features: u32) -> Self {
        Self {
            features: Some(KvmFeatures(features)),
            vcpus: [const { Vcpu::new() }; CPUS],
        }
    }

    /// Modern KVM: async PF with interrupt delivery.
    pub const fn modern() -> Self {
        Self::kvm(KvmFeatures::ASYNC_PF | KvmFeatures::ASYNC_PF_INT)
    }

    /// The MSR interface of vCPU `index` (what the guest's code on that vCPU uses).
    pub fn vcpu(&self, index: usize) -> SimVcpu<'_, CPUS> {
        SimVcpu { host: self, index }
    }

    fn regs(&self, vcpu: usize) -> Result<&Vcpu, SimError> {
        self.vcpus.get(vcpu).ok_or(SimError::NoSuchVcpu)
    }

    /// The value the guest last wrote to `MSR_KVM_ASYNC_PF_EN` on `vcpu`.
    pub fn enable_value(&self, vcpu: usize) -> Result<u64, SimError> {
        Ok(self.regs(vcpu)?.en.load(Ordering::Relaxed))
    }

    /// How many writes of `MSR_KVM_ASYNC_PF_EN` on `vcpu` the host accepted.
    pub fn enable_writes(&self, vcpu: usize) -> Result<u64, SimError> {
        Ok(self.regs(vcpu)?.en_writes.load(Ordering::Relaxed))
    }

    /// Whether async page faults are live on `vcpu`: enabled, and on a host offering
    /// `ASYNC_PF_INT` with `DELIVERY_AS_INT` too (without it such a host sends nothing).
    pub fn delivers(&self, vcpu: usize) -> Result<bool, SimError> {
        let en = self.enable_value(vcpu)?;
        let needs_int = self.has(KvmFeatures::ASYNC_PF_INT);
        Ok(en & EN_ENABLED != 0 && (!needs_int || en & EN_DELIVERY_AS_INT != 0))
    }

    fn has(&self, feature: u32) -> bool {
        self.features.is_some_and(|f| f.has(feature))
    }

    /// Delivers what the host queued for `vcpu` by itself: the wake-all of the last enable
    /// (interrupt protocol, token `0xffffffff` in the area). `Ok(None)`: nothing queued.
    /// Fails with `SlotBusy` while the guest has not consumed the previous token.
    pub fn deliver_queued(&self, vcpu: usize, cpu: &ApfCpu) -> Result<Option<Inject>, SimError> {
        self.registered(vcpu, cpu)?;
        let regs = self.regs(vcpu)?;
        if !regs.wake_all_queued.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let inject = self.put_token(vcpu, cpu, TOKEN_WAKE_ALL)?;
        regs.wake_all_queued.store(false, Ordering::Relaxed);
        Ok(Some(inject))
    }

    fn put_token(&self, vcpu: usize, cpu: &ApfCpu, token: u32) -> Result<Inject, SimError> {
        if cpu
            .area()
            .token
            .compare_exchange(0, token, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return Err(SimError::SlotBusy);
        }
        Ok(Inject::Interrupt {
            vector: self.regs(vcpu)?.vector.load(Ordering::Relaxed) as u8,
        })
    }

    /// How many times the guest wrote `MSR_KVM_ASYNC_PF_ACK` on `vcpu`.
    pub fn acks(&self, vcpu: usize) -> Result<u64, SimError> {
        Ok(self.regs(vcpu)?.acks.load(Ordering::Relaxed))
    }

    /// Checks that `vcpu` enabled async PF with `cpu`'s area, in a way this host delivers
    /// for; returns its enable value.
    fn registered(&self, vcpu: usize, cpu: &ApfCpu) -> Result<u64, SimError> {
        let en = self.enable_value(vcpu)?;
        if !self.delivers(vcpu)? {
            return Err(SimError::NotEnabled);
        }
        if en & !EN_FLAGS_MASK != cpu.area_addr() as u64 {
            return Err(SimError::WrongArea);
        }
        Ok(en)
    }

    /// The host starts bringing in the page behind `token` while `vcpu` runs: it writes
    /// "not present" into the area and injects a #PF with the token in CR2.
    pub fn not_present(&self, vcpu: usize, cpu: &ApfCpu, token: u32) -> Result<Inject, SimError> {
        self.registered(vcpu, cpu)?;
        cpu.area()
            .flags
            .store(REASON_PAGE_NOT_PRESENT, Ordering::Relaxed);
        Ok(Inject::PageFault {
            cr2: u64::from(token),
        })
    }

    /// The page behind `token` is in (`0xffffffff`: every page of `vcpu`): interrupt
    /// protocol, the token goes into the area and the page-ready vector is raised; legacy
    /// protocol, a #PF with reason 2 and the token in CR2.
    pub fn page_ready(&self, vcpu: usize, cpu: &ApfCpu, token: u32) -> Result<Inject, SimError> {
        let en = self.registered(vcpu, cpu)?;
        if en & EN_DELIVERY_AS_INT != 0 {
            if self.regs(vcpu)?.wake_all_queued.load(Ordering::Relaxed) {
                return Err(SimError::SlotBusy);
            }
            self.put_token(vcpu, cpu, token)
        } else {
            cpu.area().flags.store(REASON_PAGE_READY, Ordering::Relaxed);
            Ok(Inject::PageFault {
                cr2: u64::from(token),
            })
        }
    }

    /// Page ready for every page of `vcpu` (token `0xffffffff`).
    pub fn wake_all(&self, vcpu: usize, cpu: &ApfCpu) -> Result<Inject, SimError> {
        self.page_ready(vcpu, cpu, TOKEN_WAKE_ALL)
    }

    /// A hostile host writes whatever it likes into the first 8 bytes of the area.
    pub fn poke(&self, cpu: &ApfCpu, flags: u32, token: u32) {
        cpu.area().flags.store(flags, Ordering::Relaxed);
        cpu.area().token.store(token, Ordering::Relaxed);
    }
}

impl<const CPUS: usize> Default for SimHost<CPUS> {
    fn default() -> Self {
        Self::modern()
    }
}

/// One vCPU of a [`SimHost`]: the [`ApfHardware`] of code running on it.
#[derive(Debug, Clone, Copy)]
pub struct SimVcpu<'h, const CPUS: usize> {
    host: &'h SimHost<CPUS>,
    index: usize,
}

impl<const CPUS: usize> SimVcpu<'_, CPUS> {
    fn regs(&self) -> Result<&Vcpu, SimError> {
        if self
            .host
            .features
            .is_none_or(|f| !f.has(KvmFeatures::ASYNC_PF))
        {
            return Err(SimError::GeneralProtection);
        }
        self.host.regs(self.index)
    }
}

impl<const CPUS: usize> ApfHardware for SimVcpu<'_, CPUS> {
    type Error = SimError;

    fn probe(&self) -> Option<KvmFeatures> {
        self.host.features
    }

    fn write_int_vector(&self, vector: u8) -> Result<(), SimError> {
        let has_int = self
            .host
            .features
            .is_some_and(|f| f.has(KvmFeatures::ASYNC_PF_INT));
        if !has_int {
            return Err(SimError::GeneralProtection);
        }
        self.regs()?
            .vector
            .store(u64::from(vector), Ordering::Relaxed);
        Ok(())
    }

    unsafe fn write_enable(&self, value: u64) -> Result<(), SimError> {
        let regs = self.regs()?;
        // Bits 4 and 5 are reserved. A host with ASYNC_PF_INT accepts ENABLED without
        // DELIVERY_AS_INT and then sends nothing (`delivers`), as KVM does.
        if value & 0x30 != 0 {
            return Err(SimError::Rejected);
        }
        regs.en.store(value, Ordering::Relaxed);
        regs.en_writes.fetch_add(1, Ordering::Relaxed);
        // Enabling with interrupt delivery queues a wake-all; disabling drops the queue.
        let live = value & (EN_ENABLED | EN_DELIVERY_AS_INT) == EN_ENABLED | EN_DELIVERY_AS_INT
            && self.host.has(KvmFeatures::ASYNC_PF_INT);
        regs.wake_all_queued.store(live, Ordering::Relaxed);
        Ok(())
    }

    fn ack(&self) -> Result<(), SimError> {
        let has_int = self
            .host
            .features
            .is_some_and(|f| f.has(KvmFeatures::ASYNC_PF_INT));
        if !has_int {
            return Err(SimError::GeneralProtection);
        }
        self.regs()?.acks.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
