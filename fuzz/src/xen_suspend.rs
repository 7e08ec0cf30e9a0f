//! Harnesses of `oskit-xen-suspend`.

use oskit_xen_suspend::hal::{Cpuid, XEN_SIGNATURE, find_xen_base};

/// Arbitrary CPUID leaves: Xen detection never panics, and a base it reports really carries
/// Xen's signature and enough leaves.
pub fn cpuid(data: &[u8]) {
    struct Table(Vec<(u32, [u32; 4])>);
    impl Cpuid for Table {
        fn cpuid(&self, leaf: u32) -> [u32; 4] {
            self.0
                .iter()
                .find(|(l, _)| *l == leaf)
                .map_or([0; 4], |(_, r)| *r)
        }
    }
    let words: Vec<u32> = crate::words(data).collect();
    // Each entry: a base index (0..=0xff, so the scan can find it) and four registers.
    let table = Table(
        words
            .chunks_exact(5)
            .map(|w| {
                (
                    0x4000_0000 + (w[0] & 0xff) * 0x100,
                    [w[1], w[2], w[3], w[4]],
                )
            })
            .collect(),
    );
    if let Some(base) = find_xen_base(&table) {
        let [max, b, c, d] = table.cpuid(base);
        let sig: Vec<u8> = [b, c, d].iter().flat_map(|r| r.to_le_bytes()).collect();
        assert_eq!(sig, XEN_SIGNATURE, "reported base {base:#x} is not Xen's");
        assert!(
            max >= base + 2,
            "reported base {base:#x} has too few leaves"
        );
    }
}
