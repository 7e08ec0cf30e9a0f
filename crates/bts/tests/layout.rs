//! Byte layouts of the DS save area and BTS records, and the software record encoding.

use oskit_bts::{
    format::{BtsRecord, DsArea, FLAG_PREDICTED, Record},
    hal::{BtsHardware, BtsSupport, DebugCtl},
    sim::SoftCpu,
};
use zerocopy::{FromBytes, IntoBytes};

fn u64_at(bytes: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap())
}

#[test]
fn ds_area_fields_sit_at_the_sdm_offsets() {
    let ds = DsArea {
        bts_buffer_base: 0x1111,
        bts_index: 0x2222,
        bts_absolute_maximum: 0x3333,
        bts_interrupt_threshold: 0x4444,
        pebs_buffer_base: 0x5555,
        pebs_index: 0x6666,
        pebs_absolute_maximum: 0x7777,
        pebs_interrupt_threshold: 0x8888,
        pebs_counter_reset: [0x9999, 0xaaaa, 0xbbbb, 0xcccc],
    };
    let b = ds.as_bytes();
    assert_eq!(b.len(), 0x60);
    for (off, want) in [
        (0x00, 0x1111),
        (0x08, 0x2222),
        (0x10, 0x3333),
        (0x18, 0x4444),
        (0x20, 0x5555),
        (0x28, 0x6666),
        (0x30, 0x7777),
        (0x38, 0x8888),
        (0x40, 0x9999),
        (0x58, 0xcccc),
    ] {
        assert_eq!(u64_at(b, off), want, "offset {off:#x}");
    }
    assert_eq!(DsArea::read_from_bytes(b).unwrap(), ds);
}

#[test]
fn bts_record_is_from_to_flags_with_predicted_bit_4() {
    let mut bytes = [0u8; 24];
    bytes[..8].copy_from_slice(&0xffff_8000_0000_1000u64.to_le_bytes());
    bytes[8..16].copy_from_slice(&0x40_1000u64.to_le_bytes());
    bytes[16] = 0x10;
    let raw = BtsRecord::read_from_bytes(&bytes).unwrap();
    assert_eq!(raw.flags, FLAG_PREDICTED);
    assert_eq!(
        Record::decode(&raw),
        Record::Branch {
            from: 0xffff_8000_0000_1000,
            to: 0x40_1000,
            predicted: true
        }
    );
    bytes[16] = 0x08; // another flag bit is not "predicted"
    let raw = BtsRecord::read_from_bytes(&bytes).unwrap();
    assert!(matches!(
        Record::decode(&raw),
        Record::Branch {
            predicted: false,
            ..
        }
    ));
}

#[test]
fn task_records_use_an_escaped_from_with_the_qualifier_in_the_low_bits() {
    let arrive = Record::TaskArrives {
        timestamp: 77,
        pid: 42,
    }
    .encode();
    assert_eq!(arrive.from, 0xffff_ffff_ffff_fff2);
    assert_eq!((arrive.to, arrive.flags), (77, 42));
    let depart = Record::TaskDeparts {
        timestamp: 78,
        pid: 42,
    }
    .encode();
    assert_eq!(depart.from, 0xffff_ffff_ffff_fff3);
    for r in [
        Record::TaskArrives {
            timestamp: u64::MAX,
            pid: u32::MAX,
        },
        Record::TaskDeparts {
            timestamp: 0,
            pid: 0,
        },
        Record::Branch {
            from: 1,
            to: 0,
            predicted: false,
        },
        Record::Invalid,
    ] {
        assert_eq!(Record::decode(&r.encode()), r);
    }
    // Zeroed slots and unknown qualifiers are invalid.
    assert_eq!(Record::decode(&BtsRecord::default()), Record::Invalid);
    let unknown = BtsRecord {
        from: 0xffff_ffff_ffff_fff7,
        to: 1,
        flags: 1,
    };
    assert_eq!(Record::decode(&unknown), Record::Invalid);
    let wide_pid = BtsRecord {
        from: 0xffff_ffff_ffff_fff2,
        to: 1,
        flags: 1 << 40,
    };
    assert_eq!(Record::decode(&wide_pid), Record::Invalid);
}

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
    let none = BtsSupport::from_registers(0, 0, 1 << 11);
    assert_eq!(SoftCpu::with_support(none).probe(), none);
    assert!(SoftCpu::default().probe().usable());
}

#[test]
fn debugctl_bits_are_the_sdm_ones() {
    assert_eq!(DebugCtl::TR, 0x40);
    assert_eq!(DebugCtl::BTS, 0x80);
    assert_eq!(DebugCtl::BTINT, 0x100);
    assert_eq!(DebugCtl::BTS_OFF_OS, 0x200);
    assert_eq!(DebugCtl::BTS_OFF_USR, 0x400);
    // LBR (bit 0) and others survive a BTS update.
    let v = DebugCtl(0x1 | DebugCtl::BTINT).with_bts(DebugCtl::TR);
    assert_eq!(v.0, 0x1 | DebugCtl::TR);
}

/// The performance-monitoring LVT entry the x86 backend writes when it re-arms: fixed
/// delivery at the vector, or NMI delivery (mode 100b in bits 10:8), unmasked (bit 16 clear).
#[cfg(all(feature = "x86", target_arch = "x86_64"))]
#[test]
fn lvt_entries_encode_the_delivery_mode_unmasked() {
    use oskit_bts::x86::PmiDelivery;
    assert_eq!(PmiDelivery::Fixed(0xf0).lvt_entry(), 0xf0);
    let nmi = PmiDelivery::Nmi.lvt_entry();
    assert_eq!((nmi >> 8) & 0b111, 0b100, "delivery mode NMI");
    assert_eq!(nmi & (1 << 16), 0, "unmasked");
}
