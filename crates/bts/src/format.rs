//! Byte-exact layouts: the 64-bit DS save area, the BTS record, and the software records.

use static_assertions::{assert_eq_size, const_assert_eq};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The 64-bit Debug Store save area (CPUID.01H:ECX.DTES64), as the processor reads it through
/// IA32_DS_AREA (SDM Vol. 3B, "DS Save Area").
///
/// Only the BTS half is used by this crate; the PEBS half is kept zero.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DsArea {
    /// Linear address of the first byte of the BTS buffer.
    pub bts_buffer_base: u64,
    /// Linear address where the processor writes the next BTS record.
    pub bts_index: u64,
    /// Linear address one past the last byte usable for BTS records.
    pub bts_absolute_maximum: u64,
    /// Linear address at which reaching `bts_index` raises the threshold interrupt.
    pub bts_interrupt_threshold: u64,
    /// Linear address of the PEBS buffer (unused here).
    pub pebs_buffer_base: u64,
    /// PEBS index (unused here).
    pub pebs_index: u64,
    /// PEBS absolute maximum (unused here).
    pub pebs_absolute_maximum: u64,
    /// PEBS interrupt threshold (unused here).
    pub pebs_interrupt_threshold: u64,
    /// PEBS counter reset values for general-purpose counters 0..4 (unused here).
    pub pebs_counter_reset: [u64; 4],
}

assert_eq_size!(DsArea, [u8; 0x60]);
const_assert_eq!(core::mem::offset_of!(DsArea, bts_buffer_base), 0x00);
const_assert_eq!(core::mem::offset_of!(DsArea, bts_index), 0x08);
const_assert_eq!(core::mem::offset_of!(DsArea, bts_absolute_maximum), 0x10);
const_assert_eq!(core::mem::offset_of!(DsArea, bts_interrupt_threshold), 0x18);
const_assert_eq!(core::mem::offset_of!(DsArea, pebs_buffer_base), 0x20);
const_assert_eq!(core::mem::offset_of!(DsArea, pebs_index), 0x28);
const_assert_eq!(core::mem::offset_of!(DsArea, pebs_absolute_maximum), 0x30);
const_assert_eq!(
    core::mem::offset_of!(DsArea, pebs_interrupt_threshold),
    0x38
);
const_assert_eq!(core::mem::offset_of!(DsArea, pebs_counter_reset), 0x40);
const_assert_eq!(core::mem::align_of::<DsArea>(), 8);

/// One 64-bit BTS record as the processor stores it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct BtsRecord {
    /// Linear address of the branch instruction ("branch from").
    pub from: u64,
    /// Linear address of the branch target ("branch to").
    pub to: u64,
    /// Flags; bit 4 says the branch was predicted.
    pub flags: u64,
}

assert_eq_size!(BtsRecord, [u8; 24]);
const_assert_eq!(core::mem::offset_of!(BtsRecord, from), 0);
const_assert_eq!(core::mem::offset_of!(BtsRecord, to), 8);
const_assert_eq!(core::mem::offset_of!(BtsRecord, flags), 16);
const_assert_eq!(core::mem::align_of::<BtsRecord>(), 8);

/// Size in bytes of one BTS record.
pub const RECORD_SIZE: usize = core::mem::size_of::<BtsRecord>();

/// `BtsRecord::flags` bit 4: the branch was predicted.
pub const FLAG_PREDICTED: u64 = 1 << 4;

/// Software records (task arrive/depart) put all ones in `from` except the low
/// [`QUALIFIER_BITS`] bits, which hold the qualifier. No branch starts in the last 16 bytes
/// of the address space, so the escape cannot collide with a hardware record.
pub const QUALIFIER_BITS: u32 = 4;
const QUALIFIER_MASK: u64 = (1 << QUALIFIER_BITS) - 1;
const ESCAPE: u64 = !QUALIFIER_MASK;

/// Qualifier of a "task arrives on the CPU" record.
pub const QUALIFIER_TASK_ARRIVES: u64 = 2;
/// Qualifier of a "task departs from the CPU" record.
pub const QUALIFIER_TASK_DEPARTS: u64 = 3;

/// A decoded trace record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Record {
    /// An empty or undecodable slot.
    #[default]
    Invalid,
    /// A branch the processor stored.
    Branch {
        /// Address of the branch instruction.
        from: u64,
        /// Address of the branch target.
        to: u64,
        /// The processor predicted the branch.
        predicted: bool,
    },
    /// The traced task was scheduled in (written by the context-switch hook with `SCHED`).
    TaskArrives {
        /// The timestamp the kernel passed to the hook.
        timestamp: u64,
        /// The task's id.
        pid: u32,
    },
    /// The traced task was scheduled out (written by the context-switch hook with `SCHED`).
    TaskDeparts {
        /// The timestamp the kernel passed to the hook.
        timestamp: u64,
        /// The task's id.
        pid: u32,
    },
}

impl Record {
    /// Decodes a raw record. All-zero slots and unknown qualifiers decode as [`Record::Invalid`].
    pub const fn decode(raw: &BtsRecord) -> Self {
        if raw.from == 0 && raw.to == 0 {
            return Record::Invalid;
        }
        if raw.from & ESCAPE == ESCAPE {
            let pid = raw.flags as u32;
            if raw.flags >> 32 != 0 {
                return Record::Invalid;
            }
            return match raw.from & QUALIFIER_MASK {
                QUALIFIER_TASK_ARRIVES => Record::TaskArrives {
                    timestamp: raw.to,
                    pid,
                },
                QUALIFIER_TASK_DEPARTS => Record::TaskDeparts {
                    timestamp: raw.to,
                    pid,
                },
                _ => Record::Invalid,
            };
        }
        Record::Branch {
            from: raw.from,
            to: raw.to,
            predicted: raw.flags & FLAG_PREDICTED != 0,
        }
    }

    /// Encodes a record the way it is stored in the BTS buffer (the inverse of [`decode`]).
    ///
    /// [`decode`]: Record::decode
    pub const fn encode(&self) -> BtsRecord {
        match *self {
            Record::Invalid => BtsRecord {
                from: 0,
                to: 0,
                flags: 0,
            },
            Record::Branch {
                from,
                to,
                predicted,
            } => BtsRecord {
                from,
                to,
                flags: if predicted { FLAG_PREDICTED } else { 0 },
            },
            Record::TaskArrives { timestamp, pid } => BtsRecord {
                from: ESCAPE | QUALIFIER_TASK_ARRIVES,
                to: timestamp,
                flags: pid as u64,
            },
            Record::TaskDeparts { timestamp, pid } => BtsRecord {
                from: ESCAPE | QUALIFIER_TASK_DEPARTS,
                to: timestamp,
                flags: pid as u64,
            },
        }
    }
}
