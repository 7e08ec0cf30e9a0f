//! The KVM async-page-fault ABI: MSRs, their bits, and the shared per-CPU area.
//!
//! Values from Linux `Documentation/virt/kvm/x86/msr.rst` and the uapi header
//! `asm/kvm_para.h`.

use core::sync::atomic::AtomicU32;

use static_assertions::{assert_eq_align, assert_eq_size, const_assert_eq};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `MSR_KVM_ASYNC_PF_EN`: area address | [`EN_ENABLED`] | delivery bits.
pub const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
/// `MSR_KVM_ASYNC_PF_INT`: the page-ready interrupt vector (written before enabling).
pub const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;
/// `MSR_KVM_ASYNC_PF_ACK`: write 1 once a page-ready token has been consumed.
pub const MSR_KVM_ASYNC_PF_ACK: u32 = 0x4b56_4d07;

/// `KVM_ASYNC_PF_ENABLED`: async page faults are on.
pub const EN_ENABLED: u64 = 1 << 0;
/// `KVM_ASYNC_PF_SEND_ALWAYS`: also send "not present" while the guest runs in kernel mode.
pub const EN_SEND_ALWAYS: u64 = 1 << 1;
/// `KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT`: a nested hypervisor may see them as #PF VM exits.
pub const EN_DELIVERY_AS_PF_VMEXIT: u64 = 1 << 2;
/// `KVM_ASYNC_PF_DELIVERY_AS_INT`: "page ready" comes as an interrupt, not as a #PF.
pub const EN_DELIVERY_AS_INT: u64 = 1 << 3;
/// The low bits of [`MSR_KVM_ASYNC_PF_EN`] that are not part of the area address.
pub const EN_FLAGS_MASK: u64 = 0x3f;
/// Required alignment of the shared area (the address bits below it carry flags).
pub const AREA_ALIGN: usize = 64;

/// `KVM_PV_REASON_PAGE_NOT_PRESENT`: a #PF whose CR2 is a token, not an address.
pub const REASON_PAGE_NOT_PRESENT: u32 = 1;
/// `KVM_PV_REASON_PAGE_READY`: (legacy protocol) a #PF announcing that a token's page is in.
pub const REASON_PAGE_READY: u32 = 2;
/// The page-ready token meaning "every task of this vCPU may run again".
pub const TOKEN_WAKE_ALL: u32 = 0xffff_ffff;

/// `struct kvm_vcpu_pv_apf_data` as today's KVM defines it (interrupt-based page ready).
///
/// The host writes only `flags` and `token`; the rest is padding to 64 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C, align(64))]
pub struct ApfData {
    /// Set to [`REASON_PAGE_NOT_PRESENT`] by the host before it injects a "not present" #PF.
    pub flags: u32,
    /// The token of a page-ready interrupt; the guest clears it and writes the ACK MSR.
    pub token: u32,
    /// Reserved.
    pub pad: [u8; 56],
}

/// The original layout (the seed's `kvm_vcpu_pv_apf_data`): both events come as #PF.
///
/// The host writes only `reason`; `enabled` is a guest-private flag Linux kept there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct LegacyApfData {
    /// [`REASON_PAGE_NOT_PRESENT`] or [`REASON_PAGE_READY`]; the token is in CR2.
    pub reason: u32,
    /// Reserved.
    pub pad: [u8; 60],
    /// Guest-private: whether this CPU enabled async page faults.
    pub enabled: u32,
}

/// The live shared area: [`ApfData`]'s layout, with the two words the host writes as atomics
/// (the host writes them behind the compiler's back, so plain accesses would be a data race).
#[derive(Debug)]
#[repr(C, align(64))]
pub struct ApfArea {
    /// See [`ApfData::flags`] (and [`LegacyApfData::reason`], which lives at the same offset).
    pub flags: AtomicU32,
    /// See [`ApfData::token`].
    pub token: AtomicU32,
    pad: [u8; 56],
}

impl ApfArea {
    /// An all-zero area.
    pub const fn new() -> Self {
        Self {
            flags: AtomicU32::new(0),
            token: AtomicU32::new(0),
            pad: [0; 56],
        }
    }
}

impl Default for ApfArea {
    fn default() -> Self {
        Self::new()
    }
}

assert_eq_size!(ApfData, [u8; 64]);
const_assert_eq!(core::mem::align_of::<ApfData>(), AREA_ALIGN);
const_assert_eq!(core::mem::offset_of!(ApfData, flags), 0);
const_assert_eq!(core::mem::offset_of!(ApfData, token), 4);
const_assert_eq!(core::mem::offset_of!(ApfData, pad), 8);

assert_eq_size!(LegacyApfData, [u8; 68]);
const_assert_eq!(core::mem::align_of::<LegacyApfData>(), 4);
const_assert_eq!(core::mem::offset_of!(LegacyApfData, reason), 0);
const_assert_eq!(core::mem::offset_of!(LegacyApfData, pad), 4);
const_assert_eq!(core::mem::offset_of!(LegacyApfData, enabled), 64);

assert_eq_size!(ApfArea, ApfData);
assert_eq_align!(ApfArea, ApfData);
const_assert_eq!(
    core::mem::offset_of!(ApfArea, flags),
    core::mem::offset_of!(ApfData, flags)
);
const_assert_eq!(
    core::mem::offset_of!(ApfArea, token),
    core::mem::offset_of!(ApfData, token)
);
// The legacy `reason` is the word the host writes at offset 0 too, so one area serves both.
const_assert_eq!(
    core::mem::offset_of!(ApfArea, flags),
    core::mem::offset_of!(LegacyApfData, reason)
);
