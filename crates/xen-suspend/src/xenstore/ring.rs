//! The shared xenstore page (`struct xenstore_domain_interface`): a 1024-byte request ring,
//! a 1024-byte response ring and their free-running indices.
//!
//! The page is shared with xenstored, which may write anything at any time: every access is
//! an atomic load or store of one aligned word, indices are checked before use, and nothing
//! read from the page is trusted.

use core::sync::atomic::{AtomicU32, Ordering};

use static_assertions::const_assert_eq;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::wire::WireError;

/// Bytes of each ring (`XENSTORE_RING_SIZE`).
pub const RING_SIZE: usize = 1024;

/// `struct xenstore_domain_interface`, for its layout; the client accesses the page through
/// [`Ring`].
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Debug, Clone, Copy)]
#[repr(C)]
pub struct XenstoreDomainInterface {
    /// Requests, guest to xenstored.
    pub req: [u8; RING_SIZE],
    /// Responses and watch events, xenstored to guest.
    pub rsp: [u8; RING_SIZE],
    /// Next request byte xenstored reads.
    pub req_cons: u32,
    /// Next request byte the guest writes.
    pub req_prod: u32,
    /// Next response byte the guest reads.
    pub rsp_cons: u32,
    /// Next response byte xenstored writes.
    pub rsp_prod: u32,
    /// `XENSTORE_SERVER_FEATURE_*` bits.
    pub server_features: u32,
    /// `XENSTORE_CONNECTED` (0) or `XENSTORE_RECONNECT` (1).
    pub connection: u32,
    /// `XENSTORE_ERROR_*` when the server found the ring broken.
    pub error: u32,
}

const_assert_eq!(core::mem::offset_of!(XenstoreDomainInterface, rsp), 1024);
const_assert_eq!(
    core::mem::offset_of!(XenstoreDomainInterface, req_cons),
    2048
);
const_assert_eq!(
    core::mem::offset_of!(XenstoreDomainInterface, req_prod),
    2052
);
const_assert_eq!(
    core::mem::offset_of!(XenstoreDomainInterface, rsp_cons),
    2056
);
const_assert_eq!(
    core::mem::offset_of!(XenstoreDomainInterface, rsp_prod),
    2060
);
const_assert_eq!(
    core::mem::offset_of!(XenstoreDomainInterface, server_features),
    2064
);
const_assert_eq!(
    core::mem::offset_of!(XenstoreDomainInterface, connection),
    2068
);
const_assert_eq!(core::mem::offset_of!(XenstoreDomainInterface, error), 2072);
const_assert_eq!(core::mem::size_of::<XenstoreDomainInterface>(), 2076);

const REQ: usize = 0;
const RSP: usize = RING_SIZE;
const REQ_CONS: usize = 2048 / 4;
const REQ_PROD: usize = 2052 / 4;
const RSP_CONS: usize = 2056 / 4;
const RSP_PROD: usize = 2060 / 4;

/// Words of the shared page.
pub const PAGE_WORDS: usize = 1024;

/// The guest's end of the shared page, as aligned atomic words.
#[derive(Debug, Clone, Copy)]
pub struct Ring<'a> {
    words: &'a [AtomicU32; PAGE_WORDS],
}

impl<'a> Ring<'a> {
    /// The ring over `page` (the 4 KiB store page, mapped).
    pub const fn new(page: &'a [AtomicU32; PAGE_WORDS]) -> Self {
        Self { words: page }
    }

    /// The ring over the store page at `page`.
    ///
    /// # Safety
    /// `page` points to the 4 KiB-aligned store page, mapped readable and writable for `'a`,
    /// accessed by nothing else of this kernel but through atomics (xenstored writes it too).
    pub unsafe fn from_ptr(page: *mut u32) -> Self {
        // SAFETY: the caller guarantees a live, aligned, writable 4 KiB page shared only
        // through atomic accesses; AtomicU32 has the layout of u32.
        let words = unsafe { &*page.cast::<[AtomicU32; PAGE_WORDS]>() };
        Self { words }
    }

    fn byte(&self, base: usize, i: usize) -> u8 {
        let at = base + (i & (RING_SIZE - 1));
        (self.words[at / 4].load(Ordering::Relaxed) >> ((at % 4) * 8)) as u8
    }

    fn set_byte(&self, base: usize, i: usize, b: u8) {
        let at = base + (i & (RING_SIZE - 1));
        let w = &self.words[at / 4];
        let shift = (at % 4) * 8;
        // Only this side writes the producer region of the request ring; xenstored only
        // reads it, so a load and a store of the word lose nothing.
        let old = w.load(Ordering::Relaxed);
        w.store(
            (old & !(0xff << shift)) | (u32::from(b) << shift),
            Ordering::Relaxed,
        );
    }

    /// Bytes of the request ring the guest may write now.
    pub fn req_space(&self) -> Result<usize, WireError> {
        let cons = self.words[REQ_CONS].load(Ordering::Acquire);
        let prod = self.words[REQ_PROD].load(Ordering::Relaxed);
        let used = prod.wrapping_sub(cons) as usize;
        if used > RING_SIZE {
            return Err(WireError::BadIndex);
        }
        Ok(RING_SIZE - used)
    }

    /// Writes as much of `data` as fits into the request ring and publishes it; returns how
    /// much.
    pub fn write_req(&self, data: &[u8]) -> Result<usize, WireError> {
        let n = self.req_space()?.min(data.len());
        let prod = self.words[REQ_PROD].load(Ordering::Relaxed) as usize;
        for (i, &b) in data[..n].iter().enumerate() {
            self.set_byte(REQ, prod.wrapping_add(i), b);
        }
        // The bytes before the index (Xen's `wmb`).
        self.words[REQ_PROD].store(prod.wrapping_add(n) as u32, Ordering::Release);
        Ok(n)
    }

    /// Bytes of the response ring ready to read.
    pub fn rsp_available(&self) -> Result<usize, WireError> {
        let prod = self.words[RSP_PROD].load(Ordering::Acquire);
        let cons = self.words[RSP_CONS].load(Ordering::Relaxed);
        let n = prod.wrapping_sub(cons) as usize;
        if n > RING_SIZE {
            return Err(WireError::BadIndex);
        }
        Ok(n)
    }

    /// Reads up to `out.len()` ready response bytes and consumes them; returns how many.
    pub fn read_rsp(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let n = self.rsp_available()?.min(out.len());
        let cons = self.words[RSP_CONS].load(Ordering::Relaxed) as usize;
        for (i, o) in out[..n].iter_mut().enumerate() {
            *o = self.byte(RSP, cons.wrapping_add(i));
        }
        // Done with the bytes before handing the space back (Xen's `mb`).
        self.words[RSP_CONS].store(cons.wrapping_add(n) as u32, Ordering::Release);
        Ok(n)
    }

    /// Drops every unread response byte (stale replies after a restore).
    pub fn discard_rsp(&self) {
        let prod = self.words[RSP_PROD].load(Ordering::Acquire);
        self.words[RSP_CONS].store(prod, Ordering::Release);
    }
}
