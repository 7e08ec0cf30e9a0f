//! Wire encodings of the ABI structures, byte by byte.

use oskit_xen_suspend::abi::*;
use zerocopy::{FromBytes, IntoBytes};

#[test]
fn event_channel_structures_are_little_endian_words_in_header_order() {
    let bind = EvtchnBindVirq {
        virq: virq::TIMER + 7,
        vcpu: 0x0102_0304,
        port: 0xa0b0_c0d0,
    };
    assert_eq!(
        bind.as_bytes(),
        [7, 0, 0, 0, 4, 3, 2, 1, 0xd0, 0xc0, 0xb0, 0xa0]
    );
    let ipi = EvtchnBindIpi::read_from_bytes(&[9, 0, 0, 0, 0x2a, 0, 0, 0][..]).unwrap();
    assert_eq!((ipi.vcpu, ipi.port), (9, 42));
    assert_eq!(EvtchnUnmask { port: 5 }.as_bytes(), [5, 0, 0, 0]);
    assert_eq!(
        SchedShutdown {
            reason: shutdown::SUSPEND
        }
        .as_bytes(),
        [2, 0, 0, 0]
    );
    // Short or long buffers are errors, not panics.
    assert!(EvtchnBindVirq::read_from_bytes(&[0u8; 11][..]).is_err());
    assert!(EvtchnBindVirq::read_from_bytes(&[0u8; 13][..]).is_err());
}

#[test]
fn start_info_fields_sit_at_their_header_offsets() {
    let mut raw = vec![0u8; 1168];
    raw[..14].copy_from_slice(START_INFO_MAGIC);
    raw[56..64].copy_from_slice(&0x1234_5678_u64.to_le_bytes());
    raw[64..68].copy_from_slice(&3u32.to_le_bytes());
    raw[72..80].copy_from_slice(&0x9abc_u64.to_le_bytes());
    raw[80..84].copy_from_slice(&4u32.to_le_bytes());
    raw[128] = b'q';
    let si = StartInfo::read_from_bytes(&raw[..]).unwrap();
    assert!(si.magic.starts_with(b"xen-3.0-x86_64"));
    assert_eq!(si.store_mfn, 0x1234_5678);
    assert_eq!(si.store_evtchn, 3);
    assert_eq!(si.console_mfn, 0x9abc);
    assert_eq!(si.console_evtchn, 4);
    assert_eq!(si.cmd_line[0], b'q');
    assert_eq!(si.as_bytes(), &raw[..]);
}

#[test]
fn hvm_and_memory_structures_round_trip() {
    let p = XenHvmParam {
        domid: DOMID_SELF,
        _pad: [0; 2],
        index: hvmop::PARAM_STORE_PFN,
        value: 0xfeff,
    };
    assert_eq!(
        p.as_bytes(),
        [0xf0, 0x7f, 0, 0, 1, 0, 0, 0, 0xff, 0xfe, 0, 0, 0, 0, 0, 0]
    );
    let m = XenAddToPhysmap {
        domid: DOMID_SELF,
        size: 0,
        space: xenmem::MAPSPACE_SHARED_INFO,
        idx: 0,
        gpfn: 0x1000,
    };
    assert_eq!(XenAddToPhysmap::read_from_bytes(m.as_bytes()).unwrap(), m);
    assert_eq!(&m.as_bytes()[16..], 0x1000u64.to_le_bytes());
}
