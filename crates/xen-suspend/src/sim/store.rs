//! A small xenstore: fixed-capacity nodes, one transaction at a time, injectable conflicts.

use crate::error::errno;
use crate::hal::{Errno, Transaction, XenStore};

/// Longest path stored.
pub const MAX_PATH: usize = 48;
/// Longest value stored.
pub const MAX_VALUE: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Node {
    path: [u8; MAX_PATH],
    path_len: u8,
    value: [u8; MAX_VALUE],
    value_len: u8,
}

impl Node {
    const EMPTY: Node = Node {
        path: [0; MAX_PATH],
        path_len: 0,
        value: [0; MAX_VALUE],
        value_len: 0,
    };

    fn path(&self) -> &[u8] {
        &self.path[..self.path_len as usize]
    }

    fn value(&self) -> &[u8] {
        &self.value[..self.value_len as usize]
    }
}

/// A xenstore of at most `N` nodes. A transaction snapshots the nodes; ending it aborted, or
/// with an injected conflict (`EAGAIN`), restores the snapshot.
#[derive(Debug, Clone)]
pub struct SimStore<const N: usize> {
    nodes: [Node; N],
    snapshot: [Node; N],
    txn: Option<Transaction>,
    next_txn: Transaction,
    conflicts: u32,
    commits: u32,
}

impl<const N: usize> Default for SimStore<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> SimStore<N> {
    /// An empty store.
    pub const fn new() -> Self {
        Self {
            nodes: [Node::EMPTY; N],
            snapshot: [Node::EMPTY; N],
            txn: None,
            next_txn: 1,
            conflicts: 0,
            commits: 0,
        }
    }

    /// The next `n` transaction ends fail with `EAGAIN` (another writer got in first).
    pub fn inject_conflicts(&mut self, n: u32) {
        self.conflicts = n;
    }

    /// Transactions committed.
    pub fn commits(&self) -> u32 {
        self.commits
    }

    /// The value at `path`, outside any transaction.
    pub fn get(&self, path: &str) -> Option<&[u8]> {
        self.nodes
            .iter()
            .find(|n| n.path_len != 0 && n.path() == path.as_bytes())
            .map(Node::value)
    }

    /// Sets `path` outside any transaction (the toolstack's side).
    pub fn set(&mut self, path: &str, value: &[u8]) -> Result<(), Errno> {
        if path.is_empty() || path.len() > MAX_PATH || value.len() > MAX_VALUE {
            return Err(Errno(errno::EINVAL));
        }
        let slot = match self
            .nodes
            .iter()
            .position(|n| n.path_len != 0 && n.path() == path.as_bytes())
        {
            Some(i) => i,
            None => self
                .nodes
                .iter()
                .position(|n| n.path_len == 0)
                .ok_or(Errno(errno::ENOSPC))?,
        };
        let node = &mut self.nodes[slot];
        node.path[..path.len()].copy_from_slice(path.as_bytes());
        node.path_len = path.len() as u8;
        node.value[..value.len()].copy_from_slice(value);
        node.value_len = value.len() as u8;
        Ok(())
    }

    fn check(&self, txn: Transaction) -> Result<(), Errno> {
        if txn == 0 || self.txn == Some(txn) {
            Ok(())
        } else {
            Err(Errno(errno::EINVAL))
        }
    }
}

impl<const N: usize> XenStore for SimStore<N> {
    type Error = Errno;

    fn start(&mut self) -> Result<Transaction, Errno> {
        if self.txn.is_some() {
            return Err(Errno(errno::EBUSY));
        }
        let txn = self.next_txn;
        self.next_txn = self.next_txn.wrapping_add(1).max(1);
        self.snapshot = self.nodes;
        self.txn = Some(txn);
        Ok(txn)
    }

    fn end(&mut self, txn: Transaction, abort: bool) -> Result<(), Errno> {
        if txn == 0 || self.txn != Some(txn) {
            return Err(Errno(errno::EINVAL));
        }
        self.txn = None;
        if abort {
            self.nodes = self.snapshot;
            return Ok(());
        }
        if self.conflicts > 0 {
            self.conflicts -= 1;
            self.nodes = self.snapshot;
            return Err(Errno(errno::EAGAIN));
        }
        self.commits += 1;
        Ok(())
    }

    fn read(&mut self, txn: Transaction, path: &str, buf: &mut [u8]) -> Result<usize, Errno> {
        self.check(txn)?;
        let value = self.get(path).ok_or(Errno(errno::ENOENT))?;
        let n = value.len().min(buf.len());
        buf[..n].copy_from_slice(&value[..n]);
        Ok(value.len())
    }

    fn write(&mut self, txn: Transaction, path: &str, value: &[u8]) -> Result<(), Errno> {
        self.check(txn)?;
        self.set(path, value)
    }
}
