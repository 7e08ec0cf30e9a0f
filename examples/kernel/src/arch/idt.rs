//! The interrupt descriptor table: every vector points at its stub in [`crate::arch::trap`].

use core::{arch::asm, mem::size_of, ptr::addr_of};

use crate::{arch::gdt, arch::trap, spin::SpinLock};

#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    _reserved: u32,
}

const _: () = assert!(size_of::<Gate>() == 16);

static IDT: SpinLock<[Gate; 256]> = SpinLock::new(
    [Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        attributes: 0,
        offset_mid: 0,
        offset_high: 0,
        _reserved: 0,
    }; 256],
);

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

fn gate(handler: u64, ist: u8, dpl: u8) -> Gate {
    Gate {
        offset_low: handler as u16,
        selector: gdt::KERNEL_CS,
        ist,
        attributes: 0x8e | (dpl << 5), // present, 64-bit interrupt gate
        offset_mid: (handler >> 16) as u16,
        offset_high: (handler >> 32) as u32,
        _reserved: 0,
    }
}

/// Fills the IDT: interrupt gates for all 256 vectors, the double fault on its own stack.
/// Call it before any CPU loads the IDT.
pub fn init() {
    let stubs = addr_of!(trap::trap_stubs) as u64;
    for (vector, entry) in IDT.lock().iter_mut().enumerate() {
        let ist = if vector == 8 {
            gdt::DOUBLE_FAULT_IST
        } else {
            0
        };
        *entry = gate(stubs + 16 * vector as u64, ist, 0);
    }
}

/// Lets ring 3 raise `vector` with `int` (a system-call gate, as #BP's is for `int3`). Call it
/// before ring 3 can raise the vector.
pub fn allow_from_user(vector: u8) {
    let stubs = addr_of!(trap::trap_stubs) as u64;
    IDT.lock()[usize::from(vector)] = gate(stubs + 16 * u64::from(vector), 0, 3);
}

/// Loads the IDT on this CPU.
pub fn load() {
    let ptr = DescriptorPointer {
        limit: (size_of::<[Gate; 256]>() - 1) as u16,
        base: IDT.lock().as_ptr() as u64,
    };
    // SAFETY: the IDT is a static table of valid gates that lives forever; gates are only
    // rewritten (by `allow_from_user`) before their vector can be raised.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack)) };
}
