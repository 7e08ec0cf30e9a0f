//! The user-space side of a mapping: [`MappedReader`] reads events out of a mapped CPU buffer
//! (ours, or the running Linux kernel's through [`tracefs`](crate)), asking for a new reader
//! sub-buffer through a callback. It trusts nothing in the mapping: bad bytes give
//! [`Error::Corrupt`], never a panic or a read outside the region.

use crate::{
    error::Error,
    format::{
        self, COMMIT_MASK, MAX_SUBBUF_ORDER, PAGE_SIZE, RB_MISSED_EVENTS, RB_MISSED_STORED, Record,
        SUBBUF_HEADER_SIZE, TraceBufferMeta,
    },
};

/// Bytes of a mapping, read by copy (the other side keeps writing them).
pub trait MapRegion {
    /// Length of the region in bytes.
    fn len(&self) -> usize;

    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`; `InvalidArgument` past the end.
    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), Error>;
}

impl MapRegion for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), Error> {
        let src = offset
            .checked_add(buf.len())
            .and_then(|end| self.get(offset..end))
            .ok_or(Error::InvalidArgument)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl<R: MapRegion + ?Sized> MapRegion for &R {
    fn len(&self) -> usize {
        (**self).len()
    }

    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), Error> {
        (**self).read(offset, buf)
    }
}

/// A mapping at a raw address (what `mmap` returned), read with volatile loads: each aligned
/// 8-byte word in one load, so a word the producer updates while it is read (a reader
/// sub-buffer's commit word, when the writer is still on that sub-buffer; the meta page's
/// counters) comes out whole, as Linux's `READ_ONCE` would read it; every read ends with an
/// acquire fence, so data read after a commit word is at least as new as that word.
#[derive(Debug)]
pub struct RawRegion {
    base: *const u8,
    len: usize,
}

impl RawRegion {
    /// The `len` bytes at `base`.
    ///
    /// # Safety
    ///
    /// `base..base + len` stays mapped and readable for as long as the region is used.
    pub const unsafe fn new(base: *const u8, len: usize) -> Self {
        Self { base, len }
    }
}

impl MapRegion for RawRegion {
    fn len(&self) -> usize {
        self.len
    }

    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), Error> {
        match offset.checked_add(buf.len()) {
            Some(end) if end <= self.len => {}
            _ => return Err(Error::InvalidArgument),
        }
        // SAFETY: `offset + buf.len() <= len`: readable by the contract of `new`.
        unsafe { read_shared(self.base.wrapping_add(offset), buf) };
        Ok(())
    }
}

/// Copies `buf.len()` bytes from `src`, memory another party writes while we read (a mapped
/// ring buffer: the writer appends and moves commit words). Each aligned 8-byte word is one
/// volatile load, so a word stored whole is read whole (Linux's `READ_ONCE`; byte by byte a
/// commit word can tear into a size no writer ever published); the rest goes byte by byte.
/// Ends with an acquire fence: what is read after this (the events under a commit word) is
/// at least as new.
///
/// # Safety
///
/// `src..src + buf.len()` is readable.
pub(crate) unsafe fn read_shared(src: *const u8, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let at = src.wrapping_add(i);
        if at.addr() % 8 == 0 && buf.len() - i >= 8 {
            // SAFETY: 8 readable bytes by the contract, aligned. Volatile: the other party
            // writes behind our back.
            let word = unsafe { at.cast::<u64>().read_volatile() };
            buf[i..i + 8].copy_from_slice(&word.to_ne_bytes());
            i += 8;
        } else {
            // SAFETY: `i < buf.len()`: readable by the contract.
            buf[i] = unsafe { at.read_volatile() };
            i += 1;
        }
    }
    core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
}

/// Asks the producer for a new reader sub-buffer (`TRACE_MMAP_IOCTL_GET_READER`).
pub trait GetReader {
    /// Swaps in a reader sub-buffer and refreshes the meta page.
    fn get_reader(&mut self) -> Result<(), Error>;
}

impl<F: FnMut() -> Result<(), Error>> GetReader for F {
    fn get_reader(&mut self) -> Result<(), Error> {
        self()
    }
}

/// An event read from a mapping; its payload was copied into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedEvent {
    /// Absolute time, as the format reconstructs it.
    pub ts: u64,
    /// Stored payload length (padded to 4 bytes), copied to the front of the caller's buffer.
    pub len: usize,
    /// Events lost just before this one (from the reader sub-buffer's commit flags and stored
    /// count, or the meta page, when it was handed out).
    pub lost: u64,
    /// Events were lost just before this one: whenever `lost > 0`, and also when the producer
    /// flagged losses it could not count (`RB_MISSED_EVENTS` without `RB_MISSED_STORED` on a
    /// full sub-buffer, and no count on the meta page: then `lost` is 0).
    pub missed: bool,
}

/// Reads events out of a mapped CPU buffer.
pub struct MappedReader<R: MapRegion, G: GetReader> {
    region: R,
    get: G,
    meta: TraceBufferMeta,
    id: Option<u32>,
    pos: usize,
    /// Events starting before this offset were consumed before we mapped: skip them.
    skip: usize,
    ts: u64,
    lost: u64,
    /// Losses flagged before the next event (counted in `lost` or not).
    missed: bool,
}

impl<R: MapRegion, G: GetReader> MappedReader<R, G> {
    /// A reader over `region` (the whole mapping, meta page first). It starts with the reader
    /// sub-buffer the meta page names, after the `reader.read` bytes already consumed, with
    /// the losses before it (see [`MappedReader::get_reader`]) when none of it was consumed.
    /// Use one `MappedReader` per mapping. `Corrupt` for a meta page or lost count that does
    /// not fit the region.
    pub fn new(region: R, get: G) -> Result<Self, Error> {
        let meta = read_meta(&region)?;
        let mut reader = Self {
            region,
            get,
            meta,
            id: Some(meta.reader.id),
            pos: 0,
            skip: meta.reader.read as usize,
            ts: 0,
            lost: meta.reader.lost_events,
            missed: meta.reader.lost_events > 0,
        };
        // Losses not delivered yet come with the reader sub-buffer we start on, unless a
        // consumer before us read some of it (and took them).
        if reader.skip == 0 {
            (reader.lost, reader.missed) = reader.losses_before(meta.reader.id, &meta)?;
        }
        Ok(reader)
    }

    /// The meta page as last read (validated).
    pub fn meta(&self) -> TraceBufferMeta {
        self.meta
    }

    /// ID of the sub-buffer being read.
    pub fn reader_id(&self) -> Option<u32> {
        self.id
    }

    /// Sub-buffer size, header included.
    pub fn subbuf_size(&self) -> usize {
        self.meta.subbuf_size as usize
    }

    fn subbuf_offset(&self, id: u32) -> usize {
        // Validated in `read_meta`: fits in the region.
        self.meta.meta_page_size as usize + id as usize * self.meta.subbuf_size as usize
    }

    /// Asks for a reader sub-buffer and rereads the meta page. Returns whether a different
    /// sub-buffer than before is now the reader. The events lost before a new one come with
    /// its first event: the count stored after its events when its commit word has
    /// `RB_MISSED_STORED` (Linux 6.10 and later), else the meta page's `reader.lost_events`
    /// (never both).
    pub fn get_reader(&mut self) -> Result<bool, Error> {
        self.get.get_reader()?;
        let meta = read_meta(&self.region)?;
        if (meta.meta_page_size, meta.subbuf_size, meta.nr_subbufs)
            != (
                self.meta.meta_page_size,
                self.meta.subbuf_size,
                self.meta.nr_subbufs,
            )
        {
            return Err(Error::Corrupt);
        }
        self.meta = meta;
        let fresh = self.id != Some(meta.reader.id);
        if fresh {
            self.id = Some(meta.reader.id);
            self.pos = 0;
            self.skip = 0;
            // The producer's count covers everything lost since events were last delivered,
            // including a count we got at start and had no event to deliver with.
            (self.lost, self.missed) = self.losses_before(meta.reader.id, &meta)?;
        }
        Ok(fresh)
    }

    /// Events lost before reader sub-buffer `id`, as Linux 6.10 hands them over: the count
    /// stored after the events when the commit word says `RB_MISSED_STORED`; otherwise the
    /// meta page's `reader.lost_events` (which Linux 6.10 leaves at 0, and which a producer
    /// sets only for a count the sub-buffer does not carry). Never both: they would count
    /// the same events twice. A count that would lie outside the sub-buffer is `Corrupt`.
    /// Also says whether losses were flagged at all (a flag without a count on a full
    /// sub-buffer, on Linux).
    fn losses_before(&self, id: u32, meta: &TraceBufferMeta) -> Result<(u64, bool), Error> {
        let base = self.subbuf_offset(id);
        let commit = self.read_u64(base + 8)?;
        let flagged = commit & RB_MISSED_EVENTS != 0;
        if !flagged || commit & RB_MISSED_STORED == 0 {
            let n = meta.reader.lost_events;
            return Ok((n, flagged || n > 0));
        }
        let size = (commit & COMMIT_MASK) as usize;
        if size + 8 > self.subbuf_size() - SUBBUF_HEADER_SIZE {
            return Err(Error::Corrupt);
        }
        Ok((self.read_u64(base + SUBBUF_HEADER_SIZE + size)?, true))
    }

    fn read_u64(&self, offset: usize) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        self.region
            .read(offset, &mut b)
            .map_err(|_| Error::Corrupt)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Committed data size of the reader sub-buffer.
    fn reader_size(&self, base: usize) -> Result<usize, Error> {
        let size = (self.read_u64(base + 8)? & COMMIT_MASK) as usize;
        if size > self.subbuf_size() - SUBBUF_HEADER_SIZE {
            return Err(Error::Corrupt);
        }
        Ok(size)
    }

    /// The next event, its stored payload copied to the front of `buf` (`InvalidArgument` if
    /// `buf` is too small: a sub-buffer's size always suffices), asking for a new reader
    /// sub-buffer when the current one is used up. `Ok(None)`: nothing new.
    pub fn next_event(&mut self, buf: &mut [u8]) -> Result<Option<MappedEvent>, Error> {
        if let Some(ev) = self.next_in_subbuf(buf)? {
            return Ok(Some(ev));
        }
        // Twice: Linux hands back the same sub-buffer once when only its end padding was new.
        for _ in 0..2 {
            self.get_reader()?;
            if let Some(ev) = self.next_in_subbuf(buf)? {
                return Ok(Some(ev));
            }
        }
        Ok(None)
    }

    /// Like [`MappedReader::next_event`], but only from the current reader sub-buffer (no
    /// get-reader call).
    pub fn next_in_subbuf(&mut self, buf: &mut [u8]) -> Result<Option<MappedEvent>, Error> {
        let Some(id) = self.id else { return Ok(None) };
        let base = self.subbuf_offset(id);
        let size = self.reader_size(base)?;
        if self.pos == 0 {
            self.ts = self.read_u64(base)?;
        }
        let data = base + SUBBUF_HEADER_SIZE;
        while self.pos < size {
            let region = &self.region;
            let read = |off: usize| {
                let mut w = [0u8; 4];
                // In bounds: `off + 4 <= size` and the sub-buffer is inside the region.
                let _ = region.read(data + off, &mut w);
                u32::from_le_bytes(w)
            };
            let start = self.pos;
            let (rec, next) = format::decode_record(read, self.pos, size)?;
            self.pos = next;
            match rec {
                Record::Data { delta, .. } if start < self.skip => {
                    self.ts = self.ts.wrapping_add(u64::from(delta));
                }
                Record::Data { delta, offset, len } => {
                    self.ts = self.ts.wrapping_add(u64::from(delta));
                    let dst = buf.get_mut(..len).ok_or(Error::InvalidArgument)?;
                    self.region
                        .read(data + offset, dst)
                        .map_err(|_| Error::Corrupt)?;
                    let lost = core::mem::take(&mut self.lost);
                    let missed = core::mem::take(&mut self.missed);
                    return Ok(Some(MappedEvent {
                        ts: self.ts,
                        len,
                        lost,
                        missed,
                    }));
                }
                Record::TimeExtend(d) => self.ts = self.ts.wrapping_add(d),
                Record::TimeStamp(abs) => self.ts = format::fix_abs_ts(abs, self.ts),
                Record::PaddingToEnd | Record::Discarded => {}
            }
        }
        Ok(None)
    }

    /// Copies the whole reader sub-buffer, header included, into `out` (at least
    /// `subbuf_size` bytes); returns its size. `NotMapped` before the first
    /// [`MappedReader::get_reader`].
    pub fn copy_subbuf(&self, out: &mut [u8]) -> Result<usize, Error> {
        let id = self.id.ok_or(Error::NotMapped)?;
        let n = self.subbuf_size();
        let dst = out.get_mut(..n).ok_or(Error::InvalidArgument)?;
        self.region
            .read(self.subbuf_offset(id), dst)
            .map_err(|_| Error::Corrupt)?;
        Ok(n)
    }
}

/// Reads and checks the meta page against the region.
fn read_meta<R: MapRegion + ?Sized>(region: &R) -> Result<TraceBufferMeta, Error> {
    use zerocopy::FromBytes;
    let mut raw = [0u8; core::mem::size_of::<TraceBufferMeta>()];
    region.read(0, &mut raw).map_err(|_| Error::Corrupt)?;
    let meta = TraceBufferMeta::read_from_bytes(&raw).map_err(|_| Error::Corrupt)?;
    let page_size = meta.meta_page_size as usize;
    let subbuf = meta.subbuf_size as usize;
    let ok = meta.meta_struct_len as usize >= raw.len()
        && meta.meta_struct_len <= meta.meta_page_size
        && page_size >= PAGE_SIZE
        && page_size % PAGE_SIZE == 0
        && subbuf.is_power_of_two()
        && (PAGE_SIZE..=PAGE_SIZE << MAX_SUBBUF_ORDER).contains(&subbuf)
        && meta.nr_subbufs >= 2
        && (meta.nr_subbufs as usize)
            .checked_mul(subbuf)
            .and_then(|s| s.checked_add(page_size))
            .is_some_and(|end| end <= region.len())
        && meta.reader.id < meta.nr_subbufs
        && meta.reader.read as usize <= subbuf - SUBBUF_HEADER_SIZE;
    if ok { Ok(meta) } else { Err(Error::Corrupt) }
}
