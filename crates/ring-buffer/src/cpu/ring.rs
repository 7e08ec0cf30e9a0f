//! The ring's representation: links between sub-buffers (with the `HEAD`/`UPDATE` flags of
//! the head-page protocol), the tail word, each sub-buffer's descriptor ([`PageDesc`]) and the
//! reader's state.

use core::ptr::NonNull;

use crate::{
    format::{self, COMMIT_MASK, SUBBUF_HEADER_SIZE},
    mem::SubbufMem,
    sync::{AtomicU32, AtomicU64, Local, Ordering},
};

pub(crate) const LINK_HEAD: u32 = 1;
pub(crate) const LINK_UPDATE: u32 = 2;

/// A link: the next page's index in bits 2..18, the `HEAD`/`UPDATE` flag in bits 0..2, and a
/// generation in bits 18..32 that every clearing of a flag advances
/// ([`link_cleared`]), so a compare-and-swap that expects a link's earlier unflagged value
/// fails once the link has been flagged and cleared since (no ABA).
pub(crate) const fn link(next: u32, flag: u32) -> u32 {
    (next << 2) | flag
}
pub(crate) const fn link_next(l: u32) -> u32 {
    (l >> 2) & 0xffff
}
pub(crate) const fn link_flag(l: u32) -> u32 {
    l & 3
}
/// `l` with the flag set to `flag`, same target and generation.
pub(crate) const fn link_flagged(l: u32, flag: u32) -> u32 {
    (l & !3) | flag
}
/// The unflagged link to `next` that replaces the flagged link `l`: next generation.
pub(crate) const fn link_cleared(l: u32, next: u32) -> u32 {
    ((l & !0x3_ffff).wrapping_add(1 << 18)) | (next << 2)
}

/// A sub-buffer's entries word: the number of events reserved on it in bits 0..32, and in bits
/// 32..64 who emptied it last: [`ENTRIES_CLEAN`] (the reader, a reset or creation) or the head
/// push number `seq` ([`push_state`]), with [`PUSH_PENDING`] while that push has yet to
/// flag the next head. While pending, bits 0..32 hold the link to set the flag on.
pub(crate) const ENTRIES_CLEAN: u64 = 1 << 32;
/// See [`ENTRIES_CLEAN`].
pub(crate) const PUSH_PENDING: u32 = 2;
/// The entries word's state after head push number `seq` emptied the sub-buffer.
pub(crate) const fn push_state(seq: u64) -> u32 {
    (seq as u32) << 2
}
/// The state half of an entries word.
pub(crate) const fn entries_state(w: u64) -> u32 {
    (w >> 32) as u32
}
/// The count half of an entries word.
pub(crate) const fn entries_count(w: u64) -> u64 {
    w & 0xffff_ffff
}
/// The link of page `i` in a fresh ring of `n` pages plus the reader page (index `n`):
/// 0 -> 1 -> ... -> n - 1 -> 0 with page 0 the head, and the reader page leading to it.
pub(crate) const fn ring_link(i: u32, n: u32) -> u32 {
    if i + 1 == n {
        link(0, LINK_HEAD)
    } else if i >= n {
        link(0, 0)
    } else {
        link(i + 1, 0)
    }
}

// The tail word: offset in bits 0..24, page in 24..40, generation in 40..64.
pub(super) const PAGE_SHIFT: u32 = 24;
pub(super) const GEN_SHIFT: u32 = 40;
pub(super) const fn tail_word(page: u32, off: usize, generation: u64) -> u64 {
    (generation << GEN_SHIFT) | ((page as u64) << PAGE_SHIFT) | off as u64
}
pub(crate) const fn tail_page(t: u64) -> u32 {
    ((t >> PAGE_SHIFT) & 0xffff) as u32
}
pub(crate) const fn tail_off(t: u64) -> usize {
    (t & 0xff_ffff) as usize
}
pub(super) const fn tail_gen(t: u64) -> u64 {
    t >> GEN_SHIFT
}
/// Largest number of sub-buffers per CPU, reader included (16-bit page index in the tail).
pub(crate) const MAX_PAGES: usize = 1 << 16;

/// `stamp_pos` value that matches no tail: the next event gets an absolute time stamp.
pub(super) const STAMP_INVALID: u64 = u64::MAX;

/// One sub-buffer and its bookkeeping.
pub(crate) struct PageDesc {
    /// The sub-buffer memory (header + data).
    pub(crate) mem: SubbufMem,
    /// Next page in the ring, with the `HEAD`/`UPDATE` flags.
    pub(crate) link: AtomicU32,
    /// Events reserved on the page (what an overwrite of it loses), and who emptied it: see
    /// [`ENTRIES_CLEAN`].
    pub(crate) entries: Local<AtomicU64>,
    /// Commit value once the writer has left the page.
    pub(crate) end: AtomicU32,
    /// Data offset where the last event ended, before the end padding.
    pub(crate) real_end: AtomicU32,
    /// Published data size and `RB_MISSED_*` flags, mirrored into the page header.
    pub(crate) commit: AtomicU64,
    /// Writer: total `overrun` when it made this page the head.
    pub(crate) head_overrun: AtomicU64,
    /// Writer: number of the head push that made this page the head.
    pub(crate) push_seq: AtomicU64,
    /// Mapping: ID of this page.
    pub(crate) id: AtomicU32,
    /// Mapping: page index of ID `i` (stored in entry `i`).
    pub(crate) by_id: AtomicU32,
}

// SAFETY: `mem` is a page owned by the buffer; every access to it follows the writer/reader
// protocol of this module.
unsafe impl Send for PageDesc {}
// SAFETY: as above.
unsafe impl Sync for PageDesc {}

impl PageDesc {
    #[inline(always)]
    pub(super) fn header_word(&self, offset: usize) -> &core::sync::atomic::AtomicU64 {
        // SAFETY: the page is at least 4 KiB, page-aligned, lives as long as `self`, and the
        // header words are only ever accessed atomically.
        unsafe { core::sync::atomic::AtomicU64::from_ptr(self.mem.as_ptr().add(offset).cast()) }
    }

    /// Publishes the commit word (data size and flags).
    #[inline(always)]
    pub(crate) fn set_commit(&self, value: u64) {
        self.commit.store(value, Ordering::Release);
        self.header_word(8).store(value, Ordering::Release);
    }

    /// Events reserved on the page in its current turn.
    pub(crate) fn events(&self) -> u64 {
        entries_count(self.entries.load(Ordering::Relaxed))
    }

    /// Committed data bytes.
    pub(crate) fn size(&self) -> usize {
        (self.commit.load(Ordering::Acquire) & COMMIT_MASK) as usize
    }

    /// Empties the page's bookkeeping: no events, no end, nothing committed.
    pub(crate) fn clear(&self) {
        self.entries.store(ENTRIES_CLEAN, Ordering::Relaxed);
        self.end.store(0, Ordering::Relaxed);
        self.real_end.store(0, Ordering::Relaxed);
        self.set_commit(0);
    }

    /// Where the events of the page end, before any end padding (`real_end`, or the committed
    /// size when the writer has not set it), at most the committed size: where a lost-event
    /// count can go.
    pub(crate) fn data_end(&self) -> usize {
        let size = self.size();
        match self.real_end.load(Ordering::Relaxed) as usize {
            0 => size,
            end => end.min(size),
        }
    }

    pub(crate) fn time_stamp(&self) -> u64 {
        self.header_word(0).load(Ordering::Acquire)
    }

    pub(super) fn set_time_stamp(&self, ts: u64) {
        self.header_word(0).store(ts, Ordering::Release);
    }

    /// Start of the data area.
    #[inline(always)]
    pub(crate) fn data(&self) -> *mut u8 {
        // SAFETY: the header is inside the page.
        unsafe { self.mem.as_ptr().add(SUBBUF_HEADER_SIZE) }
    }

    /// Writes a little-endian word at data offset `off`.
    ///
    /// # Safety
    ///
    /// `off + 4` is inside the data area and the caller owns those bytes (reserved or padding).
    #[inline(always)]
    pub(super) unsafe fn put(&self, off: usize, word: u32) {
        // SAFETY: in bounds and 4-aligned (offsets are multiples of 4 from a page boundary);
        // the caller owns the bytes.
        unsafe { self.data().add(off).cast::<u32>().write(word.to_le()) }
    }

    /// Writes the header of a data event of `len` payload bytes at data offset `off` (and the
    /// zero padding of its last payload word); returns where the payload goes.
    ///
    /// # Safety
    ///
    /// The caller owns `format::event_len(len)` bytes at `off`, inside the data area.
    #[inline(always)]
    pub(super) unsafe fn put_data_header(&self, off: usize, len: usize, delta: u32) -> *mut u8 {
        let stored = format::stored_len(len);
        // SAFETY: the event lies in the caller's bytes.
        unsafe {
            let payload = if len > format::MAX_SMALL_DATA {
                self.put(off, format::header(0, delta));
                self.put(off + 4, stored as u32 + 4);
                self.data().add(off + 8)
            } else {
                self.put(off, format::header((stored / 4) as u32, delta));
                self.data().add(off + 4)
            };
            // Zero the last word when it has padding, so the padding to 4 bytes is
            // deterministic whatever the caller fills in (the caller owns all `len` bytes, so
            // a payload without padding needs no store).
            if stored != len {
                payload.add(stored - 4).cast::<u32>().write(0);
            }
            payload
        }
    }
}

/// Reader-side state, under the reader lock.
pub(crate) struct ReaderState {
    pub(crate) reader_page: u32,
    /// Bytes of the reader page consumed.
    pub(crate) read: usize,
    /// Time of the last consumed record.
    pub(crate) read_stamp: u64,
    pub(crate) last_overrun: u64,
    /// The page our last swap made the head, and the push number it was head as of.
    pub(crate) next_head: u32,
    pub(crate) last_push_seq: u64,
    /// Lost events not yet handed to the consumer.
    pub(crate) lost: u64,
    /// Lost events handed to the mapped consumer with the current reader sub-buffer (the
    /// meta page's `reader.lost_events`).
    pub(crate) meta_lost: u64,
    /// A ring page at or before the head, where the head search starts.
    pub(crate) head_hint: u32,
    /// Mapping: how many times mapped, and the meta page.
    pub(crate) map_count: u32,
    pub(crate) meta: Option<NonNull<u8>>,
}

// SAFETY: the meta page pointer is owned memory handed between CPUs under the lock.
unsafe impl Send for ReaderState {}

impl ReaderState {
    /// Starts afresh on the reader page: nothing read or lost, the time from the next page.
    /// `next_head` is the ring's head and `push_seq` the head pushes so far (so the next swap
    /// of that head finds nothing lost); the head search starts at `head_hint`.
    pub(crate) fn restart(&mut self, next_head: u32, push_seq: u64, head_hint: u32) {
        self.read = 0;
        self.read_stamp = 0;
        self.last_overrun = 0;
        self.next_head = next_head;
        self.last_push_seq = push_seq;
        self.lost = 0;
        self.meta_lost = 0;
        self.head_hint = head_hint;
    }
}
