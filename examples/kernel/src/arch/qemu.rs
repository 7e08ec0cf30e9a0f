//! Ending the run: QEMU's `isa-debug-exit` device turns a port write into QEMU's exit status.

use x86::io::outl;

/// The I/O port the runner gives `isa-debug-exit` (`iobase=0xf4`).
const DEBUG_EXIT_PORT: u16 = 0xf4;

/// How the run ended. QEMU exits with `(code << 1) | 1`: 33 for success, 35 for failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Exit {
    /// Every check passed.
    Success = 0x10,
    /// A check failed, the kernel panicked or took an unexpected exception.
    Failure = 0x11,
}

/// Ends the run with `status`; halts forever if no exit device is present.
pub fn exit(status: Exit) -> ! {
    // SAFETY: a write to the debug-exit port; with the device absent it goes nowhere.
    unsafe { outl(DEBUG_EXIT_PORT, status as u32) };
    loop {
        // SAFETY: interrupts off and halt: this CPU stops for good.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}
