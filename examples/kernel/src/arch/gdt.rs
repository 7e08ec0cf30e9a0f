//! Segments: one GDT and one TSS per CPU, laid out for SYSCALL/SYSRET.

use core::{arch::asm, mem::size_of, ptr::addr_of_mut};

/// The most CPUs the kernel brings up.
pub const MAX_CPUS: usize = 4;

/// Kernel code selector (STAR\[47:32\] for SYSCALL).
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x10;
/// User data selector, RPL 3 (SYSRET loads STAR\[63:48\] + 8).
pub const USER_DS: u16 = 0x18 | 3;
/// 64-bit user code selector, RPL 3 (SYSRET loads STAR\[63:48\] + 16).
pub const USER_CS: u16 = 0x20 | 3;
/// The TSS selector (a 16-byte system descriptor).
pub const TSS_SEL: u16 = 0x28;
/// IST slot of the double-fault handler, so a kernel stack overflow still reports.
pub const DOUBLE_FAULT_IST: u8 = 1;

const DF_STACK_SIZE: usize = 16 * 1024;

/// The 64-bit task-state segment (Intel SDM Vol. 3A, 8.7).
#[repr(C, packed(4))]
struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

const _: () = assert!(size_of::<Tss>() == 104);

const EMPTY_TSS: Tss = Tss {
    _reserved0: 0,
    rsp: [0; 3],
    _reserved1: 0,
    ist: [0; 7],
    _reserved2: 0,
    _reserved3: 0,
    iomap_base: size_of::<Tss>() as u16, // no I/O permission bitmap
};

#[repr(C, align(16))]
struct Stack([u8; DF_STACK_SIZE]);

static mut GDT: [[u64; 7]; MAX_CPUS] = [[0; 7]; MAX_CPUS];
static mut TSS: [Tss; MAX_CPUS] = [EMPTY_TSS; MAX_CPUS];
static mut DF_STACKS: [Stack; MAX_CPUS] = [const { Stack([0; DF_STACK_SIZE]) }; MAX_CPUS];

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Builds and loads `cpu`'s GDT and TSS and reloads every segment register.
///
/// # Safety
/// Called once per CPU, on that CPU, before anything depends on its segments, with
/// `cpu < MAX_CPUS` and no other CPU using index `cpu`.
pub unsafe fn init(cpu: usize) {
    assert!(cpu < MAX_CPUS, "cpu {cpu} beyond MAX_CPUS");
    // SAFETY: by the contract, only this CPU touches slot `cpu` of the static arrays.
    unsafe {
        let tss = addr_of_mut!(TSS[cpu]);
        let df_top = addr_of_mut!(DF_STACKS[cpu]) as u64 + DF_STACK_SIZE as u64;
        addr_of_mut!((*tss).ist[DOUBLE_FAULT_IST as usize - 1]).write_unaligned(df_top);
        let base = tss as u64;
        let limit = size_of::<Tss>() as u64 - 1;
        let gdt = addr_of_mut!(GDT[cpu]);
        *gdt = [
            0,
            0x00af_9a00_0000_ffff, // kernel code, 64-bit
            0x00cf_9200_0000_ffff, // kernel data
            0x00cf_f200_0000_ffff, // user data, DPL 3
            0x00af_fa00_0000_ffff, // user code, 64-bit, DPL 3
            // 64-bit available TSS (type 9), present.
            (limit & 0xffff)
                | ((base & 0xff_ffff) << 16)
                | (0x89 << 40)
                | (((limit >> 16) & 0xf) << 48)
                | (((base >> 24) & 0xff) << 56),
            base >> 32,
        ];
        let ptr = DescriptorPointer {
            limit: (size_of::<[u64; 7]>() - 1) as u16,
            base: gdt as u64,
        };
        asm!(
            "lgdt [{ptr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "mov ss, {ds:x}",
            "ltr {tss:x}",
            ptr = in(reg) &ptr,
            cs = in(reg) u64::from(KERNEL_CS),
            ds = in(reg) u64::from(KERNEL_DS),
            tss = in(reg) u64::from(TSS_SEL),
            tmp = out(reg) _,
        );
    }
}

/// Sets the stack the CPU switches to when an interrupt or exception leaves ring 3 on `cpu`.
///
/// # Safety
/// Called on `cpu` itself (or before it runs user code), with `top` the top of a stack that
/// stays valid while that CPU can run user code.
pub unsafe fn set_kernel_stack(cpu: usize, top: u64) {
    // SAFETY: by the contract this CPU owns `TSS[cpu]`; the write is unaligned-safe.
    unsafe { addr_of_mut!(TSS[cpu].rsp[0]).write_unaligned(top) };
}
