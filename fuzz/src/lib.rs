//! Fuzz harnesses of the oskit crates.
//!
//! Each harness is a function over arbitrary bytes that panics only when an invariant of the
//! crate under test is broken. The files in `fuzz_targets/` are one-line libFuzzer wrappers
//! around them, and the tests below replay every committed corpus input on stable, so a fuzz
//! finding that was fixed stays fixed.

pub mod bts;
pub mod pte_batch;
pub mod pv_apf;
pub mod ring_buffer;
pub mod xen_suspend;

/// A harness: arbitrary bytes in, a panic only on a broken invariant.
pub type Harness = fn(&[u8]);

/// Every fuzz target by name (the name of its `[[bin]]` and of its `corpus/` folder).
pub const TARGETS: &[(&str, Harness)] = &[
    ("pte_batch_copy_zap", pte_batch::copy_zap),
    ("pte_batch_contiguous", pte_batch::contiguous),
    ("xen_suspend_cpuid", xen_suspend::cpuid),
    ("xen_suspend_request", xen_suspend::request),
    ("xen_suspend_faults", xen_suspend::faults),
    ("xen_suspend_xenstore_ring", xen_suspend::xenstore_ring),
    ("bts_ops", bts::ops),
    ("bts_ds_area", bts::ds_area),
    ("pv_apf_host_events", pv_apf::host_events),
    ("ring_buffer_ops", ring_buffer::ops),
    ("ring_buffer_mapped_reader", ring_buffer::mapped_reader),
];

/// Cuts arbitrary bytes into little-endian `u32`s (a short tail is zero-padded).
pub fn words(data: &[u8]) -> impl Iterator<Item = u32> + '_ {
    data.chunks(4).map(|c| {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        u32::from_le_bytes(w)
    })
}

#[cfg(test)]
mod tests {
    use std::{fs, path::Path};

    use super::TARGETS;

    /// Replays `corpus/NAME/*` for every target; a target without inputs fails the test.
    #[test]
    fn corpora_replay_without_panic() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        for (name, harness) in TARGETS {
            let dir = root.join(name);
            let entries = fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{name}: no corpus at {}: {e}", dir.display()));
            let mut inputs = 0;
            for entry in entries {
                let path = entry.expect("corpus entry").path();
                let data = fs::read(&path).expect("corpus file");
                let replay = std::panic::catch_unwind(|| harness(&data));
                assert!(replay.is_ok(), "{name}: {} panicked", path.display());
                inputs += 1;
            }
            assert!(inputs > 0, "{name}: empty corpus in {}", dir.display());
            println!("{name}: {inputs} inputs replayed");
        }
    }

    /// Every `[[bin]]` of Cargo.toml has a harness in TARGETS, so no corpus goes unreplayed.
    #[test]
    fn every_fuzz_target_is_replayed() {
        let manifest = include_str!("../Cargo.toml");
        for line in manifest.lines() {
            if let Some(name) = line
                .strip_prefix("name = \"")
                .and_then(|l| l.strip_suffix('"'))
            {
                if name == "oskit-fuzz" {
                    continue;
                }
                assert!(
                    TARGETS.iter().any(|(t, _)| *t == name),
                    "fuzz target {name} is missing from TARGETS"
                );
            }
        }
    }
}
