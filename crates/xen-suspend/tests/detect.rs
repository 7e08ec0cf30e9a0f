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

#[test]
fn detect_reads_version_and_hypercall_msr() {
    use oskit_xen_suspend::hal::{XenCpuid, detect};
    let leaves = [
        (0x4000_0000, leaf(0x4000_0000 + 0x105, KVM)),
        (0x4000_0100, leaf(0x4000_0105, XEN)),
        (0x4000_0101, [0x0004_0011, 0, 0, 0]),
        (0x4000_0102, [1, 0x4000_0000, 0, 0]),
    ];
    assert_eq!(
        detect(&SimCpuid::new(&leaves)),
        Ok(XenCpuid {
            base: 0x4000_0100,
            major: 4,
            minor: 17,
            hypercall_pages: 1,
            hypercall_msr: 0x4000_0000,
        })
    );
    let not = detect(&SimCpuid::new(&[(0x4000_0000, leaf(0x4000_0001, KVM))]));
    assert_eq!(not, Err(oskit_xen_suspend::Error::NotXen));
    assert_eq!(not.unwrap_err().to_string(), "not running on Xen");
}

#[test]
fn hypercall_instruction_follows_the_vendor() {
    use oskit_xen_suspend::hal::{HypercallInsn, hypercall_insn};
    // Leaf 0: EBX, EDX, ECX spell the vendor.
    let vendor = |s: &[u8; 12]| {
        let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
        [(0u32, [0x16, w(0), w(8), w(4)])]
    };
    let intel = vendor(b"GenuineIntel");
    let amd = vendor(b"AuthenticAMD");
    let hygon = vendor(b"HygonGenuine");
    let other = vendor(b"VIA VIA VIA ");
    assert_eq!(
        hypercall_insn(&SimCpuid::new(&intel)),
        Some(HypercallInsn::Vmcall)
    );
    assert_eq!(
        hypercall_insn(&SimCpuid::new(&amd)),
        Some(HypercallInsn::Vmmcall)
    );
    assert_eq!(
        hypercall_insn(&SimCpuid::new(&hygon)),
        Some(HypercallInsn::Vmmcall)
    );
    assert_eq!(hypercall_insn(&SimCpuid::new(&other)), None);
}

#[cfg(all(feature = "x86", target_arch = "x86_64"))]
#[test]
#[cfg_attr(
    miri,
    ignore = "executes CPUID (inline assembly), which Miri cannot run"
)]
fn real_probe_agrees_with_the_cpu() {
    use oskit_xen_suspend::hal::{Cpuid, find_xen_base};
    use oskit_xen_suspend::x86::{Cpu, probe};
    match probe() {
        Err(e) => {
            assert_eq!(e, oskit_xen_suspend::Error::NotXen);
            assert_eq!(find_xen_base(&Cpu), None);
            println!("{e}");
        }
        Ok(info) => {
            // On a Xen guest the base leaf must carry Xen's signature.
            let [_, b, c, d] = Cpu.cpuid(info.base);
            assert_eq!(leaf(0, XEN)[1..], [b, c, d]);
            println!("skipped: running on Xen {info:?}; the not-Xen path is untestable here");
        }
    }
}
