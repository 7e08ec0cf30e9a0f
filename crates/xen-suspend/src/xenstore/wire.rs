//! The xenstore wire protocol (`xen/include/public/io/xs_wire.h`, `docs/misc/xenstore.txt`):
//! a 16-byte header, then `len` bytes of payload, the same over the shared ring and over
//! xenstored's unix socket.
//!
//! Everything parsed here may come from the other side: a bad type, a length over
//! [`PAYLOAD_MAX`] or an unterminated string is a [`WireError`], never a panic.

use static_assertions::const_assert_eq;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Largest payload of one message (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: usize = 4096;
/// Bytes of the header ([`Header`]).
pub const HEADER_LEN: usize = 16;
/// Longest absolute path (`XENSTORE_ABS_PATH_MAX`).
pub const ABS_PATH_MAX: usize = 3072;

/// Message types (`enum xsd_sockmsg_type`).
pub mod msg {
    /// `XS_CONTROL` (was `XS_DEBUG`).
    pub const CONTROL: u32 = 0;
    /// `XS_DIRECTORY`: the children of a node, NUL-separated.
    pub const DIRECTORY: u32 = 1;
    /// `XS_READ`: a node's value.
    pub const READ: u32 = 2;
    /// `XS_GET_PERMS`: a node's permissions, NUL-separated.
    pub const GET_PERMS: u32 = 3;
    /// `XS_WATCH`: `path\0token\0`.
    pub const WATCH: u32 = 4;
    /// `XS_UNWATCH`: `path\0token\0`.
    pub const UNWATCH: u32 = 5;
    /// `XS_TRANSACTION_START`: answers the new transaction id in decimal.
    pub const TRANSACTION_START: u32 = 6;
    /// `XS_TRANSACTION_END`: `T\0` commits, `F\0` aborts.
    pub const TRANSACTION_END: u32 = 7;
    /// `XS_INTRODUCE`.
    pub const INTRODUCE: u32 = 8;
    /// `XS_RELEASE`.
    pub const RELEASE: u32 = 9;
    /// `XS_GET_DOMAIN_PATH`.
    pub const GET_DOMAIN_PATH: u32 = 10;
    /// `XS_WRITE`: `path\0value` (the value is not terminated).
    pub const WRITE: u32 = 11;
    /// `XS_MKDIR`.
    pub const MKDIR: u32 = 12;
    /// `XS_RM`.
    pub const RM: u32 = 13;
    /// `XS_SET_PERMS`.
    pub const SET_PERMS: u32 = 14;
    /// `XS_WATCH_EVENT`: unsolicited, `path\0token\0`.
    pub const WATCH_EVENT: u32 = 15;
    /// `XS_ERROR`: the payload is an errno name (`"ENOENT\0"`).
    pub const ERROR: u32 = 16;
    /// `XS_IS_DOMAIN_INTRODUCED`.
    pub const IS_DOMAIN_INTRODUCED: u32 = 17;
    /// `XS_RESUME`.
    pub const RESUME: u32 = 18;
    /// `XS_SET_TARGET`.
    pub const SET_TARGET: u32 = 19;
    /// `XS_RESET_WATCHES`.
    pub const RESET_WATCHES: u32 = 21;
    /// `XS_DIRECTORY_PART`.
    pub const DIRECTORY_PART: u32 = 22;
    /// One past the last type this codec knows.
    pub const LIMIT: u32 = 23;
}

/// `struct xsd_sockmsg`: the header of every message, little-endian words.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Debug, Clone, Copy, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct Header {
    /// A [`msg`] type.
    pub ty: u32,
    /// Echoed in the reply; the client's to choose.
    pub req_id: u32,
    /// Transaction id, 0 for none.
    pub tx_id: u32,
    /// Payload bytes that follow.
    pub len: u32,
}

const_assert_eq!(core::mem::size_of::<Header>(), HEADER_LEN);
const_assert_eq!(core::mem::offset_of!(Header, req_id), 4);
const_assert_eq!(core::mem::offset_of!(Header, tx_id), 8);
const_assert_eq!(core::mem::offset_of!(Header, len), 12);

/// What is wrong with bytes from the other side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireError {
    /// A message type this codec does not know (`EINVAL`).
    BadType(u32),
    /// A payload length over [`PAYLOAD_MAX`] (`E2BIG`).
    TooLong(u32),
    /// A string field without its terminating NUL, or one that is not UTF-8 where a path is
    /// expected (`EINVAL`).
    BadString,
    /// A reply whose `req_id` is not the request's (`EIO`).
    BadId(u32),
    /// Ring indices that cannot be (more than a ring's worth unread) (`EIO`).
    BadIndex,
    /// An `XS_ERROR` reply with this errno.
    Errno(i32),
    /// Waiting on the store's event channel failed with this errno.
    Channel(i32),
    /// A request over [`PAYLOAD_MAX`], or a path or token over the client's watch storage
    /// (`E2BIG`).
    RequestTooLong,
    /// Every watch slot of the client is in use (`ENOSPC`).
    NoWatchSlot,
}

impl WireError {
    /// The Linux errno.
    pub const fn errno(self) -> i32 {
        match self {
            WireError::BadType(_) | WireError::BadString => crate::error::errno::EINVAL,
            WireError::TooLong(_) | WireError::RequestTooLong => E2BIG,
            WireError::BadId(_) | WireError::BadIndex => crate::error::errno::EIO,
            WireError::Errno(e) | WireError::Channel(e) => e,
            WireError::NoWatchSlot => crate::error::errno::ENOSPC,
        }
    }
}

impl crate::hal::HalError for WireError {
    fn errno(&self) -> i32 {
        WireError::errno(*self)
    }
}

const E2BIG: i32 = 7;

impl Header {
    /// Parses a header from the other side: the type must be known and the length at most
    /// [`PAYLOAD_MAX`].
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        let h = Header::read_from_bytes(bytes).map_err(|_| WireError::BadString)?;
        let h = Header {
            ty: u32::from_le(h.ty),
            req_id: u32::from_le(h.req_id),
            tx_id: u32::from_le(h.tx_id),
            len: u32::from_le(h.len),
        };
        if h.ty >= msg::LIMIT || h.ty == 20 {
            return Err(WireError::BadType(h.ty));
        }
        if h.len as usize > PAYLOAD_MAX {
            return Err(WireError::TooLong(h.len));
        }
        Ok(h)
    }

    /// The 16 bytes on the wire.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0; HEADER_LEN];
        out[0..4].copy_from_slice(&self.ty.to_le_bytes());
        out[4..8].copy_from_slice(&self.req_id.to_le_bytes());
        out[8..12].copy_from_slice(&self.tx_id.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
        out
    }
}

/// Splits a payload of NUL-terminated strings (`a\0b\0`) into its strings; the last must be
/// terminated. An empty payload has no strings.
pub fn strings(payload: &[u8]) -> Result<impl Iterator<Item = &[u8]>, WireError> {
    match payload.last() {
        None | Some(0) => {}
        Some(_) => return Err(WireError::BadString),
    }
    let body = payload.split_last().map_or(&[][..], |(_, b)| b);
    let empty = payload.is_empty();
    Ok(body.split(|&b| b == 0).filter(move |_| !empty))
}

/// A watch event's payload (`path\0token\0`, possibly more fields after).
pub fn watch_event(payload: &[u8]) -> Result<(&[u8], &[u8]), WireError> {
    let mut it = strings(payload)?;
    match (it.next(), it.next()) {
        (Some(path), Some(token)) => Ok((path, token)),
        _ => Err(WireError::BadString),
    }
}

/// The errno names `XS_ERROR` carries (`xsd_errors`), with their Linux numbers.
pub const ERRORS: [(&str, i32); 16] = [
    ("EINVAL", 22),
    ("EACCES", 13),
    ("EEXIST", 17),
    ("EISDIR", 21),
    ("ENOENT", 2),
    ("ENOMEM", 12),
    ("ENOSPC", 28),
    ("EIO", 5),
    ("ENOTEMPTY", 39),
    ("ENOSYS", 38),
    ("EROFS", 30),
    ("EBUSY", 16),
    ("EAGAIN", 11),
    ("EISCONN", 106),
    ("E2BIG", 7),
    ("EPERM", 1),
];

/// The errno of an `XS_ERROR` payload (`"ENOENT\0"`); unknown names are `EINVAL`, as
/// libxenstore maps them.
pub fn error_errno(payload: &[u8]) -> Result<i32, WireError> {
    let name = strings(payload)?.next().ok_or(WireError::BadString)?;
    Ok(ERRORS
        .iter()
        .find(|(n, _)| n.as_bytes() == name)
        .map_or(crate::error::errno::EINVAL, |&(_, e)| e))
}

/// The errno name of `errno` for an `XS_ERROR` reply (`EINVAL` for ones xenstore lacks).
pub fn error_name(errno: i32) -> &'static str {
    ERRORS
        .iter()
        .find(|&&(_, e)| e == errno)
        .map_or("EINVAL", |&(n, _)| n)
}

/// Parses a decimal transaction id (`"17\0"`) from a `XS_TRANSACTION_START` reply.
pub fn parse_u32(payload: &[u8]) -> Result<u32, WireError> {
    let digits = strings(payload)?.next().ok_or(WireError::BadString)?;
    if digits.is_empty() || digits.len() > 10 {
        return Err(WireError::BadString);
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(WireError::BadString);
        }
        v = v * 10 + u64::from(d - b'0');
    }
    u32::try_from(v).map_err(|_| WireError::BadString)
}
