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
fn the_sim_host_rejects_pf_delivery_on_a_modern_kvm() {
    let host = SimHost::<1>::modern();
    let cpu = ApfCpu::new();
    let legacy_only = Config {
        vector: None,
        ..Config::new(0)
    };
    // The guest tries the #PF protocol; the modern host fails the WRMSR and the guest stays off.
    let e = try_enable(&host, &cpu, cpu.area_addr() as u64, legacy_only);
    assert_eq!(e, Err(Error::Hardware(SimError::Rejected)));
    assert_eq!(cpu.protocol(), None);
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
