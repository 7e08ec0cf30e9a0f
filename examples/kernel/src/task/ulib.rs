//! The ring-3 side: system-call wrappers and the entry trampoline of user tasks.
//!
//! User tasks run plain Rust functions compiled into the kernel image (whose code and read-only
//! data ring 3 may read and execute, see [`crate::mm::vm`]). Such a function must touch no kernel
//! statics (`.data`/`.bss` are supervisor-only: the access faults and kills the task), so it
//! works on its stack, on its own user regions through raw pointers, and on string literals,
//! and talks to the kernel only through these wrappers. A panic in user code is a fault too.

use core::arch::asm;

use crate::arch::syscall::nr;

/// A raw system call with up to three arguments.
#[inline(always)]
pub fn syscall3(number: u64, a0: u64, a1: u64, a2: u64) -> i64 {
    let ret: i64;
    // SAFETY: SYSCALL enters the kernel's entry point, which preserves every register but RAX
    // (result), RCX and R11 (clobbered by the instruction).
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") number as i64 => ret,
            in("rdi") a0,
            in("rsi") a1,
            in("rdx") a2,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        )
    };
    ret
}

/// Prints `s` on the console.
pub fn write(s: &str) -> i64 {
    syscall3(nr::WRITE, s.as_ptr() as u64, s.len() as u64, 0)
}

/// `write` with a raw pointer and length (for testing the kernel's checks).
pub fn write_raw(addr: u64, len: u64) -> i64 {
    syscall3(nr::WRITE, addr, len, 0)
}

/// Ends this task with `code`.
pub fn exit(code: i64) -> ! {
    syscall3(nr::EXIT, code as u64, 0, 0);
    // SAFETY: never reached: exit does not return. UD2 faults (and kills) if it ever did.
    unsafe { asm!("ud2", options(noreturn)) }
}

/// Lets other tasks run.
pub fn yield_now() {
    syscall3(nr::YIELD, 0, 0, 0);
}

/// This task's process id.
pub fn getpid() -> u64 {
    syscall3(nr::GETPID, 0, 0, 0) as u64
}

/// Forks: the child's pid in the parent, 0 in the child, negative errno on failure.
pub fn fork() -> i64 {
    syscall3(nr::FORK, 0, 0, 0)
}

/// Waits for task `pid` and returns its exit code (negative errno if there is no such task).
pub fn wait(pid: u64) -> i64 {
    syscall3(nr::WAIT, pid, 0, 0)
}

/// The current privilege level (CS.RPL): 3 in user mode.
pub fn privilege_level() -> u64 {
    let cs: u64;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {:r}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs & 3
}

/// Where every user task starts (in ring 3): runs `entry(arg)` and exits with its result.
pub extern "C" fn user_start(entry: usize, arg: u64) -> ! {
    // SAFETY: `usermode::spawn` passes a `fn(u64) -> i64` as `entry`.
    let entry = unsafe { core::mem::transmute::<usize, fn(u64) -> i64>(entry) };
    exit(entry(arg))
}
