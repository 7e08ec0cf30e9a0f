//! Decoding what the CPU reports about BTS.

use oskit_bts::{
    hal::{BtsHardware, BtsSupport},
    sim::SoftCpu,
};

#[test]
fn probe_decodes_each_bit() {
    let all = BtsSupport::from_registers(1 << 2, 1 << 21, 0);
    assert!(all.usable());
    assert!(
        !BtsSupport::from_registers(0, 1 << 21, 0).usable(),
        "no DTES64"
    );
    assert!(!BtsSupport::from_registers(1 << 2, 0, 0).usable(), "no DS");
    let off = BtsSupport::from_registers(1 << 2, 1 << 21, 1 << 11);
    assert!(!off.bts_enabled && !off.usable(), "BTS_UNAVAILABLE set");
}

#[test]
fn soft_cpu_reports_what_it_was_given() {
    let none = BtsSupport::from_registers(0, 0, 1 << 11);
    assert_eq!(SoftCpu::with_support(none).probe(), none);
    assert!(SoftCpu::default().probe().usable());
}
