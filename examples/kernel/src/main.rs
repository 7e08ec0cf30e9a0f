//! The oskit example kernel: a small x86-64 kernel that QEMU boots with `-kernel` (PVH), and that
//! composes the oskit crates. `cargo xtask run` builds and boots it; see the workspace README.
//!
//! `README.md` next to `Cargo.toml` describes the design (scheduler, user mode, address
//! spaces, SMP), the checks, and the kernel APIs the composition steps build on.
//!
//! It is built for `x86_64-unknown-none`. On any other target the binary only says so, which
//! keeps `cargo build --workspace` and `cargo test --workspace` working on the host.

#![cfg_attr(target_os = "none", no_std, no_main)]
// A binary has no public API: `pub` marks what other modules of the kernel use.
#![allow(unreachable_pub)]
// Without a heap, a failed check carries its message in a fixed buffer inside the `Err`.
#![allow(clippy::result_large_err)]

#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod checks;
#[cfg(target_os = "none")]
mod kmain;
#[cfg(target_os = "none")]
mod mm;
#[cfg(target_os = "none")]
mod spin;
#[cfg(target_os = "none")]
mod steps;
#[cfg(target_os = "none")]
mod task;
#[cfg(target_os = "none")]
mod text;
#[cfg(target_os = "none")]
mod trace;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "oskit-example-kernel is a bare-metal kernel: build it for x86_64-unknown-none and boot \
         it with `cargo xtask run`"
    );
    std::process::exit(2);
}
