//! Finding KVM and its async-PF features, and what enabling refuses.

use oskit_pv_apf::{
    ApfCpu, AsyncPf, Config, Error, Native, Scheduler,
    abi::{ApfData, LegacyApfData},
    hal::{self, ApfHardware, KvmFeatures},
    sim::{SimError, SimHost, SimVcpu},
};
use zerocopy::{FromBytes, IntoBytes};

#[test]
fn signature_bytes_are_ebx_ecx_edx_little_endian() {
    // "KVMKVMKVM\0\0\0" as KVM returns it.
    assert_eq!(
        hal::signature(0x4b4d_564b, 0x564b_4d56, 0x0000_004d),
        hal::KVM_SIGNATURE
    );
    assert_ne!(
        hal::signature(0x566e_6558, 0x65584d4d, 0x4d4d566e),
        hal::KVM_SIGNATURE
    );
}

#[test]
fn features_are_bits_of_eax() {
    let host = SimHost::<1>::kvm(KvmFeatures::ASYNC_PF);
    let f = host.vcpu(0).probe().unwrap();
    assert!(f.has(KvmFeatures::ASYNC_PF));
    assert!(!f.has(KvmFeatures::ASYNC_PF_INT));
    assert!(!f.has(KvmFeatures::ASYNC_PF | KvmFeatures::ASYNC_PF_INT));
    assert_eq!(SimHost::<1>::bare_metal().vcpu(0).probe(), None);
}

#[test]
fn abi_bytes_match_the_uapi_layout() {
    let mut bytes = [0u8; 64];
    bytes[0..4].copy_from_slice(&1u32.to_le_bytes());
    bytes[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    let data = ApfData::read_from_bytes(&bytes[..]).unwrap();
    assert_eq!((data.flags, data.token), (1, 0xdead_beef));
    assert_eq!(data.as_bytes(), &bytes[..]);

    let mut legacy = [0u8; 68];
    legacy[0..4].copy_from_slice(&2u32.to_le_bytes());
    legacy[64..68].copy_from_slice(&1u32.to_le_bytes());
    let data = LegacyApfData::read_from_bytes(&legacy[..]).unwrap();
    assert_eq!((data.reason, data.enabled), (2, 1));
    assert!(ApfData::read_from_bytes(&legacy[..60]).is_err());
}

struct NoSched;
impl Scheduler for NoSched {
    type Task = u32;
    fn current_task(&self) -> u32 {
        0
    }
    fn current_cpu(&self) -> u32 {
        0
    }
    fn can_sleep(&self) -> bool {
        true
    }
    fn block(&self) {
        unreachable!("no test here sleeps")
    }
    fn unblock(&self, _task: u32) {}
    fn halt(&self) {
        unreachable!("no test here halts")
    }
}

fn try_enable(
    host: &SimHost<1>,
    cpu: &ApfCpu,
    phys: u64,
    config: Config,
) -> Result<(), Error<SimError>> {
    let apf: AsyncPf<SimVcpu<'_, 1>, NoSched> = AsyncPf::new(NoSched);
    // SAFETY: the sim host writes only into `cpu`, which outlives every use in these tests.
    unsafe { apf.enable_cpu(&host.vcpu(0), cpu, phys, config) }.map(|_| ())
}

#[test]
fn enable_refuses_what_cannot_work() {
    let cpu = ApfCpu::new();
    let phys = cpu.area_addr() as u64;
    let e = try_enable(&SimHost::bare_metal(), &cpu, phys, Config::new(0xec));
    assert_eq!(e, Err(Error::NotKvm));
    assert_eq!(e.unwrap_err().errno(), 19);
    let e = try_enable(&SimHost::kvm(0), &cpu, phys, Config::new(0xec));
    assert_eq!(e, Err(Error::Unsupported));
    let e = try_enable(&SimHost::modern(), &cpu, phys + 8, Config::new(0xec));
    assert_eq!(e, Err(Error::Misaligned));
    let e = try_enable(&SimHost::modern(), &cpu, phys, Config::new(14));
    assert_eq!(e, Err(Error::BadVector));
    let host = SimHost::modern();
    assert_eq!(try_enable(&host, &cpu, phys, Config::new(0xec)), Ok(()));
    assert!(cpu.protocol().is_some());
    assert_eq!(
        try_enable(&host, &cpu, phys, Config::new(0xec)),
        Err(Error::AlreadyEnabled)
    );
}

#[test]
fn a_modern_kvm_is_never_reported_enabled_in_the_legacy_protocol() {
    let host = SimHost::<1>::modern();
    let cpu = ApfCpu::new();
    let legacy_only = Config {
        vector: None,
        ..Config::new(0)
    };
    // KVM >= 5.8 would accept ENABLED without DELIVERY_AS_INT and then send nothing, so the
    // guest refuses before writing anything.
    let e = try_enable(&host, &cpu, cpu.area_addr() as u64, legacy_only);
    assert_eq!(e, Err(Error::Unsupported));
    assert_eq!(e.unwrap_err().errno(), 95);
    assert_eq!(cpu.protocol(), None);
    assert_eq!(host.enable_writes(0), Ok(0));
    // An old host (no ASYNC_PF_INT) still gets the legacy protocol.
    let old = SimHost::<1>::kvm(KvmFeatures::ASYNC_PF);
    assert_eq!(
        try_enable(&old, &cpu, cpu.area_addr() as u64, legacy_only),
        Ok(())
    );
    assert_eq!(cpu.protocol(), Some(oskit_pv_apf::Protocol::PageFault));
}

#[test]
fn the_sim_host_accepts_and_ignores_pf_delivery_on_a_modern_kvm() {
    use oskit_pv_apf::abi::EN_ENABLED;
    let host = SimHost::<1>::modern();
    let cpu = ApfCpu::new();
    // What real KVM >= 5.8 does with ENABLED alone: the WRMSR succeeds...
    let hw = host.vcpu(0);
    // SAFETY: `cpu` outlives every use of the host here; sim addresses are virtual.
    let accepted = unsafe { hw.write_enable(cpu.area_addr() as u64 | EN_ENABLED) };
    assert_eq!(accepted, Ok(()));
    // ...and no event ever comes: no queued wake-all, no not present, no page ready.
    assert_eq!(host.delivers(0), Ok(false));
    assert_eq!(host.deliver_queued(0, &cpu), Err(SimError::NotEnabled));
    assert_eq!(host.not_present(0, &cpu, 1), Err(SimError::NotEnabled));
    assert_eq!(host.page_ready(0, &cpu, 1), Err(SimError::NotEnabled));
    // Reserved bits are still refused.
    // SAFETY: as above.
    let reserved = unsafe { hw.write_enable(cpu.area_addr() as u64 | EN_ENABLED | 0x10) };
    assert_eq!(reserved, Err(SimError::Rejected));
}

#[test]
fn disable_on_a_cpu_that_never_enabled_writes_no_msr() {
    let apf: AsyncPf<SimVcpu<'_, 1>, NoSched> = AsyncPf::new(NoSched);
    let cpu = ApfCpu::new();
    // Bare metal: the MSR does not exist (a #GP) and must not be touched.
    let bare = SimHost::<1>::bare_metal();
    assert_eq!(apf.disable_cpu(&bare.vcpu(0), &cpu), Ok(()));
    let all = apf.cpu_offline(&bare.vcpu(0), &cpu, 0).unwrap();
    assert_eq!((all.woken, all.dummies_freed), (0, 0));
    // KVM where this CPU never enabled: no write either.
    let kvm = SimHost::<1>::modern();
    assert_eq!(apf.disable_cpu(&kvm.vcpu(0), &cpu), Ok(()));
    assert!(apf.cpu_offline(&kvm.vcpu(0), &cpu, 0).is_ok());
    assert_eq!(kvm.enable_writes(0), Ok(0));
    // Once enabled, disabling writes 0 once; a second disable writes nothing.
    assert_eq!(
        try_enable(&kvm, &cpu, cpu.area_addr() as u64, Config::new(0xec)),
        Ok(())
    );
    assert_eq!(apf.disable_cpu(&kvm.vcpu(0), &cpu), Ok(()));
    assert_eq!(apf.disable_cpu(&kvm.vcpu(0), &cpu), Ok(()));
    assert_eq!((kvm.enable_writes(0), kvm.enable_value(0)), (Ok(2), Ok(0)));
}

#[test]
fn pf_vmexit_delivery_is_asked_for_when_offered_unless_opted_out() {
    use oskit_pv_apf::abi::EN_DELIVERY_AS_PF_VMEXIT;
    let features = KvmFeatures::ASYNC_PF | KvmFeatures::ASYNC_PF_INT | KvmFeatures::ASYNC_PF_VMEXIT;
    for (opt_in, expected) in [(true, EN_DELIVERY_AS_PF_VMEXIT), (false, 0)] {
        let host = SimHost::<1>::kvm(features);
        let cpu = ApfCpu::new();
        let config = Config {
            pf_vmexit: opt_in,
            ..Config::new(0xec)
        };
        assert_eq!(
            try_enable(&host, &cpu, cpu.area_addr() as u64, config),
            Ok(())
        );
        assert_eq!(
            host.enable_value(0).unwrap() & EN_DELIVERY_AS_PF_VMEXIT,
            expected
        );
    }
    // Not offered: never set.
    let host = SimHost::<1>::modern();
    let cpu = ApfCpu::new();
    assert_eq!(
        try_enable(&host, &cpu, cpu.area_addr() as u64, Config::new(0xec)),
        Ok(())
    );
    assert_eq!(host.enable_value(0).unwrap() & EN_DELIVERY_AS_PF_VMEXIT, 0);
}

/// CPUID leaves of a made-up machine: `(leaf, [eax, ebx, ecx, edx])`; others read as 0.
fn fake_cpuid(leaves: &[(u32, [u32; 4])]) -> impl FnMut(u32) -> [u32; 4] + '_ {
    move |leaf| {
        leaves
            .iter()
            .find(|(l, _)| *l == leaf)
            .map_or([0; 4], |(_, r)| *r)
    }
}

const KVM_SIG: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

#[test]
fn kvm_is_found_at_any_hypervisor_base_like_linux() {
    let f = KvmFeatures::ASYNC_PF | KvmFeatures::ASYNC_PF_INT;
    // KVM behind another hypervisor's interface (Hyper-V's "Microsoft Hv" at 0x40000000).
    let hv = [0x4000_0006, 0x7263_694d, 0x666f_736f, 0x7648_2074];
    let leaves = [
        (0x4000_0000, hv),
        (
            0x4000_0100,
            [0x4000_0101, KVM_SIG[0], KVM_SIG[1], KVM_SIG[2]],
        ),
        (0x4000_0101, [f, 0, 0, 0]),
    ];
    assert_eq!(hal::find_kvm(fake_cpuid(&leaves)), Some(KvmFeatures(f)));
    // An old host leaves the base's EAX 0: it means base + 1.
    let leaves = [
        (0x4000_0000, [0, KVM_SIG[0], KVM_SIG[1], KVM_SIG[2]]),
        (0x4000_0001, [KvmFeatures::ASYNC_PF, 0, 0, 0]),
    ];
    assert_eq!(
        hal::find_kvm(fake_cpuid(&leaves)),
        Some(KvmFeatures(KvmFeatures::ASYNC_PF))
    );
    // The last base tried is 0x4000ff00; nothing beyond, and no signature means no KVM.
    let last = [
        (
            0x4000_ff00,
            [0x4000_ff01, KVM_SIG[0], KVM_SIG[1], KVM_SIG[2]],
        ),
        (0x4000_ff01, [f, 0, 0, 0]),
    ];
    assert_eq!(hal::find_kvm(fake_cpuid(&last)), Some(KvmFeatures(f)));
    let beyond = [(
        0x4001_0000,
        [0x4001_0001, KVM_SIG[0], KVM_SIG[1], KVM_SIG[2]],
    )];
    assert_eq!(hal::find_kvm(fake_cpuid(&beyond)), None);
    assert_eq!(hal::find_kvm(fake_cpuid(&[(0x4000_0000, hv)])), None);
    // A KVM range without its features leaf.
    let short = [(
        0x4000_0000,
        [0x4000_0000, KVM_SIG[0], KVM_SIG[1], KVM_SIG[2]],
    )];
    assert_eq!(hal::find_kvm(fake_cpuid(&short)), None);
}

#[test]
fn native_hook_is_always_not_async() {
    let apf: AsyncPf<Native, NoSched> = AsyncPf::new(NoSched);
    let cpu = ApfCpu::new();
    // Even with the area saying "not present", a native build never looks.
    cpu.area()
        .flags
        .store(1, core::sync::atomic::Ordering::Relaxed);
    assert!(!apf.handle_page_fault(&cpu, 0x1234).is_handled());
}

#[test]
fn either_backend_forwards_to_the_chosen_side() {
    use oskit_pv_apf::hal::Either;
    let kvm = SimHost::<1>::modern();
    let bare = SimHost::<1>::bare_metal();
    let left: Either<SimVcpu<'_, 1>, SimVcpu<'_, 1>> = Either::Left(kvm.vcpu(0));
    let right: Either<SimVcpu<'_, 1>, SimVcpu<'_, 1>> = Either::Right(bare.vcpu(0));
    assert!(left.probe().is_some());
    assert_eq!(right.probe(), None);
    assert_eq!(left.ack(), Ok(()));
    assert_eq!(kvm.acks(0), Ok(1));
    assert_eq!(right.ack(), Err(Either::Right(SimError::GeneralProtection)));
    const { assert!(!<Either<Native, Native> as ApfHardware>::MAY_BE_GUEST) };
    const { assert!(<Either<Native, SimVcpu<'static, 1>> as ApfHardware>::MAY_BE_GUEST) };
}
