//! Finding Xen's CPUID leaves.

use oskit_xen_suspend::{hal::find_xen_base, sim::SimCpuid};

const XEN: [u32; 3] = [0x566e_6558, 0x6558_4d4d, 0x4d4d_566e]; // "XenVMMXenVMM"
const KVM: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

fn leaf(max: u32, sig: [u32; 3]) -> [u32; 4] {
    [max, sig[0], sig[1], sig[2]]
}

#[test]
fn finds_xen_at_first_base() {
    let leaves = [(0x4000_0000, leaf(0x4000_0005, XEN))];
    assert_eq!(find_xen_base(&SimCpuid::new(&leaves)), Some(0x4000_0000));
}

#[test]
fn finds_xen_behind_another_signature() {
    let leaves = [
        (0x4000_0000, leaf(0x4000_000b, KVM)),
        (0x4000_0100, leaf(0x4000_0105, XEN)),
    ];
    assert_eq!(find_xen_base(&SimCpuid::new(&leaves)), Some(0x4000_0100));
}

#[test]
fn rejects_other_hypervisors_and_short_leaf_ranges() {
    assert_eq!(
        find_xen_base(&SimCpuid::new(&[(0x4000_0000, leaf(0x4000_0001, KVM))])),
        None
    );
    // Xen's signature but too few leaves to find the hypercall MSR.
    assert_eq!(
        find_xen_base(&SimCpuid::new(&[(0x4000_0000, leaf(0x4000_0001, XEN))])),
        None
    );
}
