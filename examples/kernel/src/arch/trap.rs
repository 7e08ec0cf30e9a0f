//! Trap entry: one stub per vector, a common register save, and the Rust dispatcher.
//!
//! Every vector has a 16-byte stub at `trap_stubs + 16 * vector` that pushes a zero error code
//! when the CPU does not, then the vector number, and jumps to the common path, which saves the
//! general registers into a [`TrapFrame`] and calls [`trap_dispatch`].
//!
//! A trap from ring 3 (saved CS with RPL 3) runs `swapgs` on entry and again on the way out
//! (`trap_return`), so the kernel always finds its per-CPU data at `gs:0` (see
//! [`crate::arch::percpu`]). `trap_return` is also how new user tasks first enter ring 3.
//!
//! An exception no handler claims is fatal when it came from ring 0 (the run fails with the
//! vector, error code, RIP and CR2), and kills only the task when it came from ring 3.

use core::{
    arch::global_asm,
    sync::atomic::{AtomicUsize, Ordering},
};

use crate::arch::qemu::{self, Exit};

/// Pushes the general registers (RAX first, R15 last) so that the stack holds them in
/// [`TrapFrame`] order; [`pop_gprs`] takes them back. The trap and system-call entries both
/// build their frame with it.
macro_rules! push_gprs {
    () => {
        "
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
        "
    };
}

/// Pops what [`push_gprs`] pushed (R15 first, RAX last).
macro_rules! pop_gprs {
    () => {
        "
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
        "
    };
}

pub(crate) use {pop_gprs, push_gprs};

global_asm!(
    r#"
    .section .text
    .p2align 4
    .global trap_stubs
trap_stubs:
    .set vec, 0
    .rept 256
    .p2align 4
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp trap_common
    .set vec, vec + 1
    .endr

trap_common:
    testb $3, 24(%rsp)
    jz 1f
    swapgs
1:
"#,
    push_gprs!(),
    r#"
    movq %rsp, %rdi
    cld
    call trap_dispatch
    .global trap_return
trap_return:
"#,
    pop_gprs!(),
    r#"
    testb $3, 24(%rsp)
    jz 2f
    cli
    swapgs
2:
    addq $16, %rsp
    iretq
"#,
    options(att_syntax)
);

unsafe extern "C" {
    /// The 256 entry stubs, 16 bytes apart.
    pub static trap_stubs: [u8; 256 * 16];
}

/// The interrupted context as the stubs save it; handlers may change it before it resumes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// The vector the stub pushed.
    pub vector: u64,
    /// The CPU's error code, or 0 for vectors without one.
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl TrapFrame {
    /// All registers zero.
    pub const ZERO: Self = Self {
        r15: 0,
        r14: 0,
        r13: 0,
        r12: 0,
        r11: 0,
        r10: 0,
        r9: 0,
        r8: 0,
        rbp: 0,
        rdi: 0,
        rsi: 0,
        rdx: 0,
        rcx: 0,
        rbx: 0,
        rax: 0,
        vector: 0,
        error_code: 0,
        rip: 0,
        cs: 0,
        rflags: 0,
        rsp: 0,
        ss: 0,
    };
}

/// Whether a handler dealt with a trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Resume the interrupted context.
    Yes,
    /// Not this handler's trap: an exception becomes fatal (in ring 3: kills the task).
    No,
}

/// A handler for one vector.
pub type Handler = fn(&mut TrapFrame) -> Handled;

static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];

/// Installs `handler` for `vector`, replacing any earlier one.
pub fn set_handler(vector: u8, handler: Handler) {
    HANDLERS[usize::from(vector)].store(handler as usize, Ordering::Release);
}

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved",
];

/// Called by `trap_common` with the saved context.
#[unsafe(no_mangle)]
extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    let vector = (frame.vector & 0xff) as usize;
    let raw = HANDLERS[vector].load(Ordering::Acquire);
    if raw != 0 {
        // SAFETY: only `set_handler` stores into HANDLERS, and it stores `Handler` values.
        let handler: Handler = unsafe { core::mem::transmute::<usize, Handler>(raw) };
        if handler(frame) == Handled::Yes {
            return;
        }
    }
    if frame.is_from_user() {
        kill_user(frame);
    }
    fatal(frame);
}

impl TrapFrame {
    /// Whether the trap interrupted ring 3.
    pub fn is_from_user(&self) -> bool {
        self.cs & 3 == 3
    }
}

/// CR2: the address of the last page fault.
pub fn cr2() -> u64 {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    cr2
}

fn name_of(vector: usize) -> &'static str {
    EXCEPTION_NAMES
        .get(vector)
        .copied()
        .unwrap_or("unexpected interrupt")
}

/// Reports an exception a user task took and nobody resolved, and ends that task only.
fn kill_user(frame: &TrapFrame) -> ! {
    let vector = frame.vector as usize;
    let pid = crate::task::sched::current().map_or(0, |t| t.pid());
    crate::println!(
        "user fault: task {pid:#x} ({}) on cpu {} killed by {} (vector {vector}) error={:#x} rip={:#x} cr2={:#x}",
        crate::task::sched::current_name(),
        crate::arch::percpu::cpu_id(),
        name_of(vector),
        frame.error_code,
        frame.rip,
        cr2()
    );
    crate::task::sched::exit_current(crate::task::sched::EXIT_KILLED)
}

/// Reports an unhandled trap and fails the run.
fn fatal(frame: &TrapFrame) -> ! {
    let cr2 = cr2();
    let vector = frame.vector as usize;
    let name = name_of(vector);
    if let Some(slot) = crate::task::sched::stack_guard_slot(cr2) {
        crate::arch::serial::print_emergency(format_args!(
            "\nkernel stack overflow: task slot {slot} ran into its guard page at {cr2:#x}"
        ));
    }
    crate::arch::serial::print_emergency(format_args!(
        "\nEXCEPTION: {name} (vector {vector}) error={:#x} rip={:#x} cr2={cr2:#x} cs={:#x} rsp={:#x} rflags={:#x}\n",
        frame.error_code, frame.rip, frame.cs, frame.rsp, frame.rflags
    ));
    qemu::exit(Exit::Failure)
}
