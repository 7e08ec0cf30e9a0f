//! The x86-64 machine: boot (PVH entry, AP trampoline), descriptor tables, traps, the local
//! APIC and its timer, SMP bring-up and cross-CPU calls, per-CPU data, the system-call entry,
//! the serial console, and QEMU's exit device.

pub mod apic;
pub mod gdt;
pub mod idt;
pub mod percpu;
pub mod pvh;
pub mod qemu;
pub mod serial;
pub mod smp;
pub mod syscall;
pub mod trap;
