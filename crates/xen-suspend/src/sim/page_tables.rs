//! Simulated page-table roots: the guest's list of PGDs, pinned through the host.

use crate::error::errno;
use crate::hal::{Errno, PageTables, RootState};

use super::host::SimGuest;

/// The guest's page-table roots over caller-provided storage, pinned and unpinned through a
/// [`super::SimXen`] (which counts the pins to check that every root is pinned at the save).
#[derive(Debug)]
pub struct SimPageTables<'h, 'r, const CPUS: usize, const PORTS: usize> {
    guest: SimGuest<'h, CPUS, PORTS>,
    roots: &'r mut [RootState],
}

impl<'h, 'r, const CPUS: usize, const PORTS: usize> SimPageTables<'h, 'r, CPUS, PORTS> {
    /// Registers `roots` (their `pinned` flags as Xen's pins) with the host behind `guest`.
    pub fn new(guest: SimGuest<'h, CPUS, PORTS>, roots: &'r mut [RootState]) -> Self {
        let pinned = roots.iter().filter(|r| r.pinned).count();
        guest.register_roots(roots.len(), pinned);
        Self { guest, roots }
    }

    /// The roots.
    pub fn roots(&self) -> &[RootState] {
        self.roots
    }
}

impl<const CPUS: usize, const PORTS: usize> PageTables for SimPageTables<'_, '_, CPUS, PORTS> {
    type Error = Errno;

    fn switch_to_kernel_root(&mut self) {
        self.guest.load_kernel_root();
    }

    fn root_count(&self) -> usize {
        self.roots.len()
    }

    fn root(&self, index: usize) -> RootState {
        self.roots.get(index).copied().unwrap_or_default()
    }

    fn pin(&mut self, index: usize) -> Result<(), Errno> {
        let root = self.roots.get_mut(index).ok_or(Errno(errno::EINVAL))?;
        // Xen refuses to pin a pinned table.
        if root.pinned {
            return Err(Errno(errno::EINVAL));
        }
        self.guest.pin_root(true)?;
        root.pinned = true;
        Ok(())
    }

    fn unpin(&mut self, index: usize) -> Result<(), Errno> {
        let root = self.roots.get_mut(index).ok_or(Errno(errno::EINVAL))?;
        if !root.pinned {
            return Err(Errno(errno::EINVAL));
        }
        self.guest.pin_root(false)?;
        root.pinned = false;
        Ok(())
    }

    fn set_save_pinned(&mut self, index: usize, mark: bool) {
        if let Some(root) = self.roots.get_mut(index) {
            root.save_pinned = mark;
        }
    }
}
