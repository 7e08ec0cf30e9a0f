//! Reading a BTS buffer back through its DS area, which is untrusted: whatever `bts_index`
//! says, the view stays inside the buffer.

use crate::format::{BtsRecord, DsArea, RECORD_SIZE, Record};

/// Where `ds.bts_index` points, as a record index into a buffer of `capacity` records that
/// really starts at `base`: an index below `base` is 0, past the end is `capacity`, and a
/// misaligned one is rounded down to a whole record.
pub const fn clamp_index(ds: &DsArea, base: u64, capacity: usize) -> usize {
    let Some(offset) = ds.bts_index.checked_sub(base) else {
        return 0;
    };
    let records = offset / RECORD_SIZE as u64;
    if records >= capacity as u64 {
        capacity
    } else {
        records as usize
    }
}

/// The records of a BTS buffer, oldest to newest.
#[derive(Debug, Clone, Copy)]
pub struct TraceView<'a> {
    records: &'a [BtsRecord],
    index: usize,
    wrapped: bool,
}

impl<'a> TraceView<'a> {
    /// A view of `records` (the buffer that really starts at linear address `base`) through
    /// the untrusted `ds`. In a `circular` buffer, a non-empty record at the write index means
    /// the processor wrapped (the tracer zeroes the buffer whenever it resets the index), so
    /// every slot is valid and the oldest is at the index.
    pub fn new(records: &'a [BtsRecord], ds: &DsArea, base: u64, circular: bool) -> Self {
        let index = clamp_index(ds, base, records.len());
        let wrapped = circular
            && records
                .get(index)
                .is_some_and(|r| *r != BtsRecord::default());
        Self {
            records,
            index,
            wrapped,
        }
    }

    /// The number of records.
    pub const fn len(&self) -> usize {
        if self.wrapped {
            self.records.len()
        } else {
            self.index
        }
    }

    /// Whether there are none.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the processor wrapped around (the oldest records were overwritten).
    pub const fn wrapped(&self) -> bool {
        self.wrapped
    }

    /// The record index (0..=capacity) the next record goes to.
    pub const fn index(&self) -> usize {
        self.index
    }

    /// The `n`th newest record (0 = newest), raw.
    pub fn newest_raw(&self, n: usize) -> Option<&'a BtsRecord> {
        if n >= self.len() {
            return None;
        }
        // `n < len <= capacity`, and `index <= capacity`.
        let at = if n < self.index {
            self.index - 1 - n
        } else {
            // Only when wrapped: continue from the end of the buffer.
            self.records.len() - 1 - (n - self.index)
        };
        self.records.get(at)
    }

    /// The `n`th newest record (0 = newest), decoded.
    pub fn newest(&self, n: usize) -> Option<Record> {
        self.newest_raw(n).map(Record::decode)
    }

    /// The two runs of raw records, oldest first: (older, newer).
    pub fn as_slices(&self) -> (&'a [BtsRecord], &'a [BtsRecord]) {
        let (head, tail) = self.records.split_at(self.index);
        if self.wrapped {
            (tail, head)
        } else {
            (&[], head)
        }
    }

    /// The records oldest first, decoded.
    pub fn iter(&self) -> impl Iterator<Item = Record> + 'a {
        let (a, b) = self.as_slices();
        a.iter().chain(b).map(Record::decode)
    }
}
