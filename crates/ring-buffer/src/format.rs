//! Linux's ring-buffer binary format, 64-bit little-endian, byte for byte.
//!
//! A sub-buffer is a [`SubbufHeader`] (`{u64 time_stamp; u64 commit}`) followed by events. Every
//! event starts with a `u32` header: `type_len` in bits 0..5 and `time_delta` in bits 5..32.
//!
//! | `type_len` | meaning                                                                 |
//! |------------|-------------------------------------------------------------------------|
//! | 1..=28     | data, `4 * type_len` payload bytes follow the header                    |
//! | 0          | data, `array[0]` = 4 + payload bytes, payload follows `array[0]`        |
//! | 29         | padding: delta 0 = rest of the sub-buffer unused; else `array[0]` + 4 bytes discarded |
//! | 30         | time extend: `(array[0] << 27) + time_delta` is added to the time       |
//! | 31         | absolute time stamp (59 bits, top 5 bits from the previous time)        |
//!
//! This is what `events/header_page` and `events/header_event` of a tracefs mount describe.
//! The decoder here trusts nothing: every length is checked against the sub-buffer.

use static_assertions::{const_assert, const_assert_eq};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::Error;

/// Size of a page, the unit sub-buffers and mappings are made of.
pub const PAGE_SIZE: usize = 4096;
/// Largest sub-buffer order (`4 KiB << 8` = 1 MiB).
pub const MAX_SUBBUF_ORDER: u32 = 8;
/// Size of the sub-buffer header (`BUF_PAGE_HDR_SIZE`); events start at this offset.
pub const SUBBUF_HEADER_SIZE: usize = 16;
/// Size of an event header (`RB_EVNT_HDR_SIZE`).
pub const EVENT_HEADER_SIZE: usize = 4;
/// Events are aligned to 4 bytes (`RB_ALIGNMENT` on 64-bit x86).
pub const ALIGNMENT: usize = 4;
/// Largest payload stored with `type_len` 1..=28 (`RB_MAX_SMALL_DATA`).
pub const MAX_SMALL_DATA: usize = 28 * ALIGNMENT;
/// Size of a time extend or absolute time-stamp event.
pub const TIME_EXTEND_SIZE: usize = 8;
/// Largest `time_delta` that fits an event header (27 bits).
pub const MAX_DELTA: u64 = (1 << 27) - 1;

/// `type_len` of a padding event.
pub const TYPE_PADDING: u32 = 29;
/// `type_len` of a time extend.
pub const TYPE_TIME_EXTEND: u32 = 30;
/// `type_len` of an absolute time stamp.
pub const TYPE_TIME_STAMP: u32 = 31;
/// Largest `type_len` of a data event.
pub const TYPE_DATA_MAX: u32 = 28;

/// `commit` flag: events were lost between the previous sub-buffer and this one.
pub const RB_MISSED_EVENTS: u64 = 1 << 31;
/// `commit` flag: the number of lost events is stored as a `u64` right after the data.
pub const RB_MISSED_STORED: u64 = 1 << 30;
/// Bits of `commit` that hold the data size (what `libtraceevent`'s kbuffer uses).
pub const COMMIT_MASK: u64 = (1 << 27) - 1;

/// Top 5 bits of a time that an absolute time-stamp event does not store.
const TS_MSB: u64 = 0xf8 << 56;

/// Header of every sub-buffer (`struct buffer_data_page` without its data).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct SubbufHeader {
    /// Time of the first event of the sub-buffer; events carry deltas from it.
    pub time_stamp: u64,
    /// Bytes of events (`& COMMIT_MASK`) plus the `RB_MISSED_*` flags.
    pub commit: u64,
}

const_assert_eq!(core::mem::size_of::<SubbufHeader>(), SUBBUF_HEADER_SIZE);
const_assert_eq!(core::mem::offset_of!(SubbufHeader, commit), 8);

/// Size of the whole event that stores `payload_len` bytes (header, length word, padding to 4).
pub const fn event_len(payload_len: usize) -> usize {
    // Linux stores a zero-length payload as 4 bytes ("zero length can cause confusions").
    let len = if payload_len == 0 { 1 } else { payload_len };
    let len = if len > MAX_SMALL_DATA { len + 4 } else { len };
    (len + EVENT_HEADER_SIZE + ALIGNMENT - 1) & !(ALIGNMENT - 1)
}

/// The payload bytes an event of `payload_len` occupies (the length rounded up to 4, at least 4).
pub const fn stored_len(payload_len: usize) -> usize {
    let len = if payload_len == 0 { 1 } else { payload_len };
    (len + ALIGNMENT - 1) & !(ALIGNMENT - 1)
}

/// Largest payload a sub-buffer of `subbuf_size` bytes takes (`max_data_size` in Linux).
pub const fn max_payload(subbuf_size: usize) -> usize {
    subbuf_size - SUBBUF_HEADER_SIZE - 2 * 4
}

/// The header word of an event.
pub const fn header(type_len: u32, time_delta: u32) -> u32 {
    (time_delta << 5) | (type_len & 31)
}

/// Header word and optional `array[0]` of a data event of `payload_len` bytes, with the offset
/// of the payload from the start of the event.
pub const fn data_header(payload_len: usize, delta: u32) -> (u32, Option<u32>, usize) {
    let stored = stored_len(payload_len);
    if payload_len > MAX_SMALL_DATA {
        (header(0, delta), Some(stored as u32 + 4), 8)
    } else {
        (header((stored / ALIGNMENT) as u32, delta), None, 4)
    }
}

/// Splits a 59-bit value into the `(header, array[0])` words of a time extend or time stamp.
pub const fn time_event(type_len: u32, value: u64) -> (u32, u32) {
    (
        header(type_len, (value & MAX_DELTA) as u32),
        ((value >> 27) & 0xffff_ffff) as u32,
    )
}

/// The `commit` word of a sub-buffer with `len` bytes of events that follow lost events, in a
/// data area of `data_size` bytes: `RB_MISSED_EVENTS`, and `RB_MISSED_STORED` when the 8-byte
/// count fits after the events (the caller stores it at `len`).
pub(crate) const fn missed_commit(len: usize, data_size: usize) -> u64 {
    let commit = len as u64 | RB_MISSED_EVENTS;
    if data_size - len >= 8 {
        commit | RB_MISSED_STORED
    } else {
        commit
    }
}

/// Restores the top bits of an absolute time stamp from the time before it (Linux's
/// `rb_fix_abs_ts`).
pub const fn fix_abs_ts(abs: u64, prev: u64) -> u64 {
    if prev & TS_MSB != 0 {
        let fixed = abs | (prev & TS_MSB);
        if fixed < prev {
            return fixed.wrapping_add(1 << 59);
        }
        return fixed;
    }
    abs
}

/// One decoded record of a sub-buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// A data event: its payload is `len` bytes at `offset` (from the start of the data area).
    Data {
        /// Time delta from the previous event.
        delta: u32,
        /// Offset of the payload in the data area.
        offset: usize,
        /// Stored payload length (a multiple of 4).
        len: usize,
    },
    /// Padding to the end of the sub-buffer.
    PaddingToEnd,
    /// A discarded event.
    Discarded,
    /// A time extend: add this to the time.
    TimeExtend(u64),
    /// An absolute time stamp (59 bits; fix the top bits with [`fix_abs_ts`]).
    TimeStamp(u64),
}

/// Decodes the record at `offset` of a data area whose committed size is `size`.
///
/// `read_u32(off)` returns the little-endian word at `off` of the data area; `offset + 4 <=
/// size` is checked before every call. Returns the record and the offset of the next one.
pub fn decode_record(
    read_u32: impl Fn(usize) -> u32,
    offset: usize,
    size: usize,
) -> Result<(Record, usize), Error> {
    let word = |off: usize| -> Result<u32, Error> {
        if off.checked_add(4).is_some_and(|e| e <= size) {
            Ok(read_u32(off))
        } else {
            Err(Error::Corrupt)
        }
    };
    let hdr = word(offset)?;
    let type_len = hdr & 31;
    let delta = hdr >> 5;
    let end = |len: usize| -> Result<usize, Error> {
        match offset.checked_add(len) {
            Some(e) if e <= size => Ok(e),
            _ => Err(Error::Corrupt),
        }
    };
    match type_len {
        TYPE_PADDING if delta == 0 => Ok((Record::PaddingToEnd, size)),
        TYPE_PADDING => {
            let len = (word(offset + 4)? as usize)
                .checked_add(4)
                .ok_or(Error::Corrupt)?;
            if len < 8 {
                return Err(Error::Corrupt);
            }
            let len = (len + ALIGNMENT - 1) & !(ALIGNMENT - 1);
            Ok((Record::Discarded, end(len)?))
        }
        TYPE_TIME_EXTEND | TYPE_TIME_STAMP => {
            let hi = u64::from(word(offset + 4)?);
            let value = (hi << 27) | u64::from(delta);
            let rec = if type_len == TYPE_TIME_EXTEND {
                Record::TimeExtend(value)
            } else {
                Record::TimeStamp(value)
            };
            Ok((rec, end(TIME_EXTEND_SIZE)?))
        }
        0 => {
            let a = word(offset + 4)? as usize;
            let len = a.checked_sub(4).ok_or(Error::Corrupt)?;
            let len = (len + ALIGNMENT - 1) & !(ALIGNMENT - 1);
            let next = end(8usize.checked_add(len).ok_or(Error::Corrupt)?)?;
            Ok((
                Record::Data {
                    delta,
                    offset: offset + 8,
                    len,
                },
                next,
            ))
        }
        _ => {
            let len = type_len as usize * ALIGNMENT;
            Ok((
                Record::Data {
                    delta,
                    offset: offset + 4,
                    len,
                },
                end(4 + len)?,
            ))
        }
    }
}

/// A data event decoded from a sub-buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedEvent<'a> {
    /// Absolute time, as the format reconstructs it.
    pub ts: u64,
    /// Payload as stored (padded to 4 bytes).
    pub payload: &'a [u8],
}

/// A whole sub-buffer held in memory (a page of a `trace_pipe_raw` capture, a `dump` file, ...)
/// decoded event by event. Arbitrary bytes give [`Error::Corrupt`], never a panic.
#[derive(Debug, Clone)]
pub struct Subbuf<'a> {
    header: SubbufHeader,
    data: &'a [u8],
    pos: usize,
    ts: u64,
}

impl<'a> Subbuf<'a> {
    /// Parses the header of `bytes` (one sub-buffer, header included).
    pub fn new(bytes: &'a [u8]) -> Result<Self, Error> {
        let (header, data) = SubbufHeader::read_from_prefix(bytes).map_err(|_| Error::Corrupt)?;
        let size = (header.commit & COMMIT_MASK) as usize;
        if size > data.len() {
            return Err(Error::Corrupt);
        }
        Ok(Self {
            header,
            data: &data[..size],
            pos: 0,
            ts: header.time_stamp,
        })
    }

    /// The sub-buffer header.
    pub fn header(&self) -> SubbufHeader {
        self.header
    }

    /// Events were lost before this sub-buffer: `Some(Some(n))` when the count is stored,
    /// `Some(None)` when it is not known, `None` when nothing was lost.
    pub fn missed_events(&self, whole: &[u8]) -> Option<Option<u64>> {
        if self.header.commit & RB_MISSED_EVENTS == 0 {
            return None;
        }
        if self.header.commit & RB_MISSED_STORED == 0 {
            return Some(None);
        }
        let at = SUBBUF_HEADER_SIZE + self.data.len();
        Some(
            whole
                .get(at..at + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))),
        )
    }

    /// The next data event, `Ok(None)` at the end of the committed data.
    pub fn next_event(&mut self) -> Result<Option<ParsedEvent<'a>>, Error> {
        let data = self.data;
        while self.pos < data.len() {
            let read = |off: usize| {
                let mut w = [0u8; 4];
                w.copy_from_slice(&data[off..off + 4]);
                u32::from_le_bytes(w)
            };
            let (rec, next) = decode_record(read, self.pos, data.len())?;
            self.pos = next;
            match rec {
                Record::Data { delta, offset, len } => {
                    self.ts = self.ts.wrapping_add(u64::from(delta));
                    return Ok(Some(ParsedEvent {
                        ts: self.ts,
                        payload: &data[offset..offset + len],
                    }));
                }
                Record::TimeExtend(d) => self.ts = self.ts.wrapping_add(d),
                Record::TimeStamp(abs) => self.ts = fix_abs_ts(abs, self.ts),
                Record::PaddingToEnd | Record::Discarded => {}
            }
        }
        Ok(None)
    }
}

/// One event as the examples print it: `cpu=<n> ts=<u64> len=<bytes> data=<hex>`.
#[derive(Debug, Clone, Copy)]
pub struct EventLine<'a> {
    /// CPU of the buffer.
    pub cpu: usize,
    /// Absolute time.
    pub ts: u64,
    /// Stored payload.
    pub payload: &'a [u8],
}

impl core::fmt::Display for EventLine<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "cpu={} ts={} len={} data=",
            self.cpu,
            self.ts,
            self.payload.len()
        )?;
        self.payload.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// `struct trace_buffer_meta` of `include/uapi/linux/trace_mmap.h`: the first page of a
/// mapping.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct TraceBufferMeta {
    /// Size of the meta page (padded to the sub-buffer size).
    pub meta_page_size: u32,
    /// Size of this structure.
    pub meta_struct_len: u32,
    /// Size of each sub-buffer, header included.
    pub subbuf_size: u32,
    /// Number of sub-buffers, the reader included.
    pub nr_subbufs: u32,
    /// The current reader sub-buffer.
    pub reader: ReaderMeta,
    /// 0 for now.
    pub flags: u64,
    /// Events written into the buffer.
    pub entries: u64,
    /// Events lost by overwriting.
    pub overrun: u64,
    /// Events read.
    pub read: u64,
    /// Reserved.
    pub reserved1: u64,
    /// Reserved.
    pub reserved2: u64,
}

/// The `reader` member of [`TraceBufferMeta`].
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct ReaderMeta {
    /// Events lost at the time of the last reader swap.
    pub lost_events: u64,
    /// Sub-buffer ID of the reader, `0..nr_subbufs`.
    pub id: u32,
    /// Bytes of the reader sub-buffer already read.
    pub read: u32,
}

const_assert_eq!(core::mem::size_of::<TraceBufferMeta>(), 80);
const_assert_eq!(core::mem::align_of::<TraceBufferMeta>(), 8);
const_assert_eq!(core::mem::offset_of!(TraceBufferMeta, subbuf_size), 8);
const_assert_eq!(core::mem::offset_of!(TraceBufferMeta, nr_subbufs), 12);
const_assert_eq!(core::mem::offset_of!(TraceBufferMeta, reader), 16);
const_assert_eq!(core::mem::offset_of!(ReaderMeta, id), 8);
const_assert_eq!(core::mem::offset_of!(ReaderMeta, read), 12);
const_assert_eq!(core::mem::offset_of!(TraceBufferMeta, flags), 32);
const_assert_eq!(core::mem::offset_of!(TraceBufferMeta, entries), 40);
const_assert_eq!(core::mem::offset_of!(TraceBufferMeta, overrun), 48);
const_assert_eq!(core::mem::offset_of!(TraceBufferMeta, read), 56);
const_assert_eq!(core::mem::offset_of!(TraceBufferMeta, reserved2), 72);
const_assert!(core::mem::size_of::<TraceBufferMeta>() <= PAGE_SIZE);

/// `TRACE_MMAP_IOCTL_GET_READER` = `_IO('R', 0x20)`.
pub const TRACE_MMAP_IOCTL_GET_READER: u32 = ((b'R' as u32) << 8) | 0x20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lengths_follow_linux() {
        assert_eq!(event_len(0), 8);
        assert_eq!(event_len(1), 8);
        assert_eq!(event_len(4), 8);
        assert_eq!(event_len(5), 12);
        assert_eq!(event_len(112), 116);
        assert_eq!(event_len(113), 124);
        assert_eq!(event_len(max_payload(4096)), 4080);
        assert_eq!(TRACE_MMAP_IOCTL_GET_READER, 0x5220);
    }

    #[test]
    fn event_line_is_the_examples_format() {
        extern crate std;
        use std::format;
        let line = EventLine {
            cpu: 3,
            ts: 1_000_000_007,
            payload: &[0xde, 0xad, 0x00, 0x01],
        };
        assert_eq!(format!("{line}"), "cpu=3 ts=1000000007 len=4 data=dead0001");
    }

    #[test]
    fn abs_ts_fix_keeps_top_bits_and_carries() {
        assert_eq!(fix_abs_ts(5, 3), 5);
        let prev = (0x08 << 56) | 100;
        assert_eq!(fix_abs_ts(200, prev), (0x08 << 56) | 200);
        assert_eq!(fix_abs_ts(50, prev), (0x08 << 56) + (1 << 59) + 50);
    }
}
