//! Per-CPU state: the area shared with the host, and which protocol this CPU enabled.

use core::sync::atomic::{AtomicU8, Ordering};

use crate::abi::{ApfArea, REASON_PAGE_NOT_PRESENT, REASON_PAGE_READY, TOKEN_WAKE_ALL};

/// How page-ready events reach this CPU; chosen when it is enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Today's KVM: "not present" is a #PF with `flags` = 1 and the token in CR2; "page ready"
    /// is an interrupt on `vector` with the token in the shared area, acknowledged by MSR.
    Interrupt {
        /// The page-ready vector (32..=255).
        vector: u8,
    },
    /// The original protocol (KVM before 5.8, `KVM_FEATURE_ASYNC_PF` only): both events are
    /// a #PF with `reason` 1 or 2 and the token in CR2.
    PageFault,
}

/// An async-PF event found at the top of the page-fault handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PfEvent {
    /// The page behind `token` is being brought in by the host: wait for it.
    NotPresent(u32),
    /// (Legacy protocol) the page behind the token is in: wake its waiter.
    Ready(u32),
    /// (Legacy protocol) token `0xffffffff`: wake every waiter of this CPU.
    ReadyAll,
    /// (Interrupt protocol) non-zero `flags` that are not "not present". The fault is
    /// swallowed (the access re-executes); reported so the kernel can log it.
    Unexpected(u32),
}

const OFF: u8 = 0;
const INTERRUPT: u8 = 1;
const PAGE_FAULT: u8 = 2;

/// One CPU's async-PF state: the 64-byte area the host writes (first, so it is 64-byte
/// aligned) and the protocol enabled on it. Keep one per CPU in static memory (an array
/// indexed by CPU number works) and never move it while enabled.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct ApfCpu {
    area: ApfArea,
    mode: AtomicU8,
    vector: AtomicU8,
}

impl ApfCpu {
    /// Disabled, with a zeroed area.
    pub const fn new() -> Self {
        Self {
            area: ApfArea::new(),
            mode: AtomicU8::new(OFF),
            vector: AtomicU8::new(0),
        }
    }

    /// The shared area; its guest-physical address is what `MSR_KVM_ASYNC_PF_EN` gets.
    pub fn area(&self) -> &ApfArea {
        &self.area
    }

    /// The virtual address of the shared area, for the kernel to translate to physical.
    pub fn area_addr(&self) -> usize {
        core::ptr::from_ref(&self.area) as usize
    }

    /// The protocol enabled on this CPU, if any.
    pub fn protocol(&self) -> Option<Protocol> {
        match self.mode.load(Ordering::Relaxed) {
            INTERRUPT => Some(Protocol::Interrupt {
                vector: self.vector.load(Ordering::Relaxed),
            }),
            PAGE_FAULT => Some(Protocol::PageFault),
            _ => None,
        }
    }

    pub(crate) fn set_protocol(&self, protocol: Option<Protocol>) {
        let mode = match protocol {
            None => OFF,
            Some(Protocol::Interrupt { vector }) => {
                self.vector.store(vector, Ordering::Relaxed);
                INTERRUPT
            }
            Some(Protocol::PageFault) => PAGE_FAULT,
        };
        self.mode.store(mode, Ordering::Relaxed);
    }

    pub(crate) fn clear_area(&self) {
        self.area.flags.store(0, Ordering::Relaxed);
        self.area.token.store(0, Ordering::Relaxed);
    }

    /// Whether the host has written `flags`/`reason` (an async-PF #PF may be in progress):
    /// the one load the ordinary fault pays.
    ///
    /// On x86-64 this is exactly `cmp dword ptr [flags], 0` and a `jne` to the caller's slow
    /// path. LLVM does not fold an atomic load into a compare (a `Relaxed` load costs `mov`,
    /// `test`, `jne`), and a volatile read would fold but races with the writers in the Rust
    /// memory model, so the compare is written by hand: one aligned 4-byte read, single-copy
    /// atomic on x86, which is all a `Relaxed` load promises. Elsewhere (and under Miri) it is
    /// a `Relaxed` load.
    #[inline(always)]
    pub fn event_pending(&self) -> bool {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        {
            // SAFETY: the asm reads the 4 bytes of `self.area.flags`, a live, 4-byte aligned
            // `AtomicU32` borrowed for the whole statement, with one aligned `cmp` (an atomic
            // read on x86, like the `Relaxed` load it stands for); it writes no memory
            // (`readonly`), uses no stack (`nostack`) and changes only the arithmetic flags
            // (no `preserves_flags`). The `label` block is an ordinary Rust jump target.
            unsafe {
                core::arch::asm!(
                    "cmp dword ptr [{flags}], 0",
                    "jne {pending}",
                    flags = in(reg) self.area.flags.as_ptr(),
                    pending = label { return true; },
                    options(nostack, readonly),
                );
            }
            false
        }
        #[cfg(not(all(target_arch = "x86_64", not(miri))))]
        {
            self.area.flags.load(Ordering::Relaxed) != 0
        }
    }

    /// The top of the page-fault handler: reads and clears `flags`/`reason` before anything
    /// that could fault again, and classifies the fault. `cr2` is CR2 as read on entry.
    ///
    /// The ordinary fault costs one load and one branch: `flags` is 0 unless the host has
    /// just injected an async PF (and stays 0 while disabled).
    #[inline(always)]
    pub fn take_pf_event(&self, cr2: u64) -> Option<PfEvent> {
        if !self.event_pending() {
            return None;
        }
        self.take_pf_event_slow(cr2)
    }

    #[cold]
    #[inline(never)]
    fn take_pf_event_slow(&self, cr2: u64) -> Option<PfEvent> {
        let reason = self.area.flags.swap(0, Ordering::Relaxed);
        // The token is the low 32 bits of CR2 in both protocols.
        let token = cr2 as u32;
        match (self.mode.load(Ordering::Relaxed), reason) {
            (_, 0) | (OFF, _) => None,
            (INTERRUPT, r) if r & REASON_PAGE_NOT_PRESENT != 0 => Some(PfEvent::NotPresent(token)),
            (INTERRUPT, r) => Some(PfEvent::Unexpected(r)),
            (_, REASON_PAGE_NOT_PRESENT) => Some(PfEvent::NotPresent(token)),
            (_, REASON_PAGE_READY) if token == TOKEN_WAKE_ALL => Some(PfEvent::ReadyAll),
            (_, REASON_PAGE_READY) => Some(PfEvent::Ready(token)),
            // The original protocol leaves unknown reasons to the ordinary handler.
            (_, _) => None,
        }
    }

    /// The top of the page-ready interrupt handler (interrupt protocol): takes the token the
    /// host left and clears it. `None` if this CPU is not in the interrupt protocol or the
    /// token is 0 (a spurious interrupt).
    pub fn take_ready_token(&self) -> Option<u32> {
        if self.mode.load(Ordering::Relaxed) != INTERRUPT {
            return None;
        }
        match self.area.token.swap(0, Ordering::Relaxed) {
            0 => None,
            token => Some(token),
        }
    }
}

impl Default for ApfCpu {
    fn default() -> Self {
        Self::new()
    }
}
