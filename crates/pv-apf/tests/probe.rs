//! Finding KVM and its async-PF features.

use oskit_pv_apf::{
    hal::{self, ApfHardware, KvmFeatures},
    sim::SimHost,
};

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
    let f = SimHost::kvm(KvmFeatures::ASYNC_PF).probe().unwrap();
    assert!(f.has(KvmFeatures::ASYNC_PF));
    assert!(!f.has(KvmFeatures::ASYNC_PF_INT));
    assert!(!f.has(KvmFeatures::ASYNC_PF | KvmFeatures::ASYNC_PF_INT));
    assert_eq!(SimHost::bare_metal().probe(), None);
}
