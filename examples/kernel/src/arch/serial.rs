//! The 16550 UART on COM1: the kernel's console, and the runner's only view of the kernel.

use core::fmt::{self, Write};

use x86::io::{inb, outb};

use crate::spin::SpinLock;

const COM1: u16 = 0x3f8;

/// COM1, transmit side.
struct Uart;

impl Uart {
    fn write_byte(&mut self, byte: u8) {
        // SAFETY: COM1's line-status and data registers; port I/O touches no memory.
        unsafe {
            while inb(COM1 + 5) & 0x20 == 0 {
                core::hint::spin_loop();
            }
            outb(COM1, byte);
        }
    }
}

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(|b| self.write_byte(b));
        Ok(())
    }
}

static CONSOLE: SpinLock<Uart> = SpinLock::new(Uart);

/// Programs COM1 for 115200 8N1 with FIFOs, polled (no interrupts).
pub fn init() {
    // SAFETY: the standard 16550 initialisation sequence on COM1's ports.
    unsafe {
        outb(COM1 + 1, 0x00); // no interrupts
        outb(COM1 + 3, 0x80); // DLAB on
        outb(COM1, 0x01); // divisor 1: 115200 baud
        outb(COM1 + 1, 0x00);
        outb(COM1 + 3, 0x03); // 8N1, DLAB off
        outb(COM1 + 2, 0xc7); // FIFOs on, cleared, 14-byte threshold
        outb(COM1 + 4, 0x0b); // DTR, RTS, OUT2
    }
}

/// Writes formatted text to the console.
pub fn print(args: fmt::Arguments<'_>) {
    // Printing never fails on a polled UART.
    let _ = CONSOLE.lock().write_fmt(args);
}

/// Writes raw bytes (a user task's output) to the console.
pub fn write_bytes(bytes: &[u8]) {
    let mut uart = CONSOLE.lock();
    bytes.iter().for_each(|&b| uart.write_byte(b));
}

/// Writes formatted text even if the console lock is held, for the dying paths (panic, fatal
/// exception) that may have interrupted a printer on this very CPU.
pub fn print_emergency(args: fmt::Arguments<'_>) {
    let _ = Uart.write_fmt(args);
}

/// Prints to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::arch::serial::print(format_args!($($arg)*)) };
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::arch::serial::print(format_args!("{}\n", format_args!($($arg)*))) };
}
