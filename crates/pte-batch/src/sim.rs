//! Software model of the hardware: a page table in ordinary memory.

/// Entries per last-level table with 4 KiB pages and 8-byte entries.
pub const PTRS_PER_TABLE: usize = 512;

/// One last-level page table held in ordinary memory, as the MMU would see it.
#[derive(Debug, Clone)]
pub struct SimTable {
    entries: [u64; PTRS_PER_TABLE],
}

impl Default for SimTable {
    fn default() -> Self {
        Self {
            entries: [0; PTRS_PER_TABLE],
        }
    }
}

impl SimTable {
    /// The entry at `index`, or `None` past the end of the table.
    pub fn get(&self, index: usize) -> Option<u64> {
        self.entries.get(index).copied()
    }

    /// Writes the entry at `index`; returns `false` (and writes nothing) past the end.
    pub fn set(&mut self, index: usize, pte: u64) -> bool {
        match self.entries.get_mut(index) {
            Some(slot) => {
                *slot = pte;
                true
            }
            None => false,
        }
    }
}
