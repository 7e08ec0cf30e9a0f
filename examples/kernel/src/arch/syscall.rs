//! The system-call entry (SYSCALL/SYSRET) and the system-call table.
//!
//! ABI (Linux x86-64's): number in RAX, arguments in RDI, RSI, RDX, R10, R8, R9, result in
//! RAX (negative errno on error); RCX and R11 are clobbered. The entry switches to the task's
//! kernel stack (`gs:` [`percpu::KERNEL_STACK_OFFSET`]) and saves a full [`TrapFrame`] there, so
//! a system call can block, be preempted, or be copied (fork) like any trap. Interrupts stay
//! off in the kernel (SFMASK clears IF); the return is SYSRET with the frame's RIP and RFLAGS.
//!
//! Handlers live in a table indexed by number; [`register`] adds one (the composition steps
//! add e.g. map-trace-buffer and get-reader at the numbers [`nr`] reserves).

use core::{
    arch::global_asm,
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
};

use crate::{
    arch::gdt,
    arch::percpu,
    arch::trap::{TrapFrame, pop_gprs, push_gprs},
};

/// System-call numbers.
pub mod nr {
    /// `write(buf, len)`: prints `len` bytes from `buf` to the console; returns `len`.
    pub const WRITE: u64 = 0;
    /// `exit(code)`: ends the calling task; does not return.
    pub const EXIT: u64 = 1;
    /// `yield()`: lets other tasks run; returns 0.
    pub const YIELD: u64 = 2;
    /// `getpid()`: the caller's process id.
    pub const GETPID: u64 = 3;
    /// `fork()`: a copy-on-write copy of the caller; returns the child's pid, 0 in the child.
    pub const FORK: u64 = 4;
    /// `wait(pid)`: waits for task `pid` to exit and returns its exit code.
    pub const WAIT: u64 = 5;
    /// Reserved: map the trace buffer read-only into the caller (composition step "trace").
    pub const MAP_TRACE_BUFFER: u64 = 16;
    /// Reserved: describe the mapped trace buffer to a reader (composition step "trace").
    pub const GET_READER: u64 = 17;
}

/// Table size: numbers at or above it return `-ENOSYS`.
pub const MAX_SYSCALLS: usize = 32;
/// Linux's ENOSYS.
pub const ENOSYS: i64 = 38;

/// A system-call handler: reads its arguments from the frame, returns the result for RAX.
pub type Handler = fn(&mut TrapFrame) -> i64;

static TABLE: [AtomicUsize; MAX_SYSCALLS] = [const { AtomicUsize::new(0) }; MAX_SYSCALLS];

/// System calls served since boot.
pub static COUNT: AtomicU64 = AtomicU64::new(0);

/// Installs `handler` as system call `number` (replacing any earlier one).
pub fn register(number: u64, handler: Handler) {
    TABLE[number as usize].store(handler as usize, Ordering::Release);
}

global_asm!(
    r#"
    .section .text
    .global syscall_entry
syscall_entry:
    swapgs
    movq %rsp, %gs:{user_rsp}
    movq %gs:{kernel_stack}, %rsp
    pushq ${user_ds}
    pushq %gs:{user_rsp}
    pushq %r11
    pushq ${user_cs}
    pushq %rcx
    pushq $0
    pushq $0x100
"#,
    push_gprs!(),
    r#"
    movq %rsp, %rdi
    cld
    call syscall_dispatch
    cli
"#,
    pop_gprs!(),
    r#"
    addq $16, %rsp
    popq %rcx
    addq $8, %rsp
    popq %r11
    popq %rsp
    swapgs
    sysretq
"#,
    user_rsp = const percpu::USER_RSP_OFFSET,
    kernel_stack = const percpu::KERNEL_STACK_OFFSET,
    user_ds = const gdt::USER_DS,
    user_cs = const gdt::USER_CS,
    options(att_syntax)
);

unsafe extern "C" {
    static syscall_entry: u8;
}

#[unsafe(no_mangle)]
extern "C" fn syscall_dispatch(frame: &mut TrapFrame) {
    COUNT.fetch_add(1, Ordering::Relaxed);
    let number = frame.rax;
    let raw = TABLE
        .get(frame.rax as usize)
        .map_or(0, |h| h.load(Ordering::Acquire));
    let result = if raw == 0 {
        -ENOSYS
    } else {
        // SAFETY: only `register` stores into TABLE, and it stores `Handler` values.
        let handler = unsafe { core::mem::transmute::<usize, Handler>(raw) };
        handler(frame)
    };
    frame.rax = result as u64;
    // SYSRET to a non-canonical RIP would fault in ring 0 on the user's stack: a handler that
    // redirects the task must keep RIP in the user half.
    assert!(
        frame.rip < crate::mm::vm::USER_END,
        "system call {number} returns to non-canonical {:#x}",
        frame.rip
    );
}

const IA32_STAR: u32 = 0xc000_0081;
const IA32_LSTAR: u32 = 0xc000_0082;
const IA32_FMASK: u32 = 0xc000_0084;

/// Programs this CPU's SYSCALL MSRs (EFER.SCE is set by the boot code and the AP trampoline).
///
/// # Safety
/// Ring 0, after this CPU's GDT (with the user selectors SYSRET relies on) and per-CPU data.
pub unsafe fn init_this_cpu() {
    // SYSRET: CS = STAR[63:48] + 16, SS = STAR[63:48] + 8; SYSCALL: CS = STAR[47:32], SS + 8.
    let sysret_base = u64::from(gdt::USER_DS - 8);
    let star = (sysret_base << 48) | (u64::from(gdt::KERNEL_CS) << 32);
    // TF, DF, IF, IOPL, NT, AC: cleared on entry.
    let fmask = 0x4_7700;
    // SAFETY: by the contract; the entry point handles every SYSCALL from ring 3.
    unsafe {
        x86::msr::wrmsr(IA32_STAR, star);
        x86::msr::wrmsr(IA32_LSTAR, &raw const syscall_entry as u64);
        x86::msr::wrmsr(IA32_FMASK, fmask);
    }
}

/// System calls served through [`on_general_protection`] (kvm_pvm's way of reporting them).
pub static VIA_GP: AtomicU64 = AtomicU64::new(0);

/// A #GP whose frame says "ring 3, at `syscall_entry`" is how kvm_pvm (the paravirtual KVM of
/// this project's CI machine) reports the SYSCALL of a guest that does not speak its own
/// event-delivery ABI: the frame then holds what SYSCALL itself leaves, RCX = the user's
/// return RIP and R11 = its RFLAGS, with RAX and the arguments as the task set them
/// (measured). This handler serves it as the system call it is and returns with IRETQ; any
/// other #GP is left to the usual handling. On TCG and hardware KVM it never fires.
pub fn on_general_protection(frame: &mut TrapFrame) -> crate::arch::trap::Handled {
    let entry = &raw const syscall_entry as u64;
    // Ring 3 may also jump to `syscall_entry` itself (kernel text is user-executable here) and
    // fault on its SWAPGS with whatever RCX it likes: only a return into user space is served.
    if !frame.is_from_user()
        || frame.rip != entry
        || frame.error_code != 0
        || frame.rcx >= crate::mm::vm::USER_END
    {
        return crate::arch::trap::Handled::No;
    }
    VIA_GP.fetch_add(1, Ordering::Relaxed);
    // Where SYSRET would return: the instruction after the SYSCALL, with the task's flags
    // (forced to user-legal ones: IF on, IOPL 0, as SYSRET leaves them).
    frame.rip = frame.rcx;
    frame.rflags = (frame.r11 | 0x200) & !0x3000;
    syscall_dispatch(frame);
    crate::arch::trap::Handled::Yes
}
