//! `cargo xtask setup`: installs what `run` and `test` need, and nothing when it is all there.

use std::process::Command;

use crate::cmd;

/// The bare-metal target the kernel and the `no_std` builds use.
pub const TARGET: &str = "x86_64-unknown-none";
/// The QEMU binary the runner boots.
pub const QEMU: &str = "qemu-system-x86_64";

/// Installs Debian's `qemu-system-x86` (as root) and the bare-metal Rust target when missing.
/// When a step cannot be done here, says which command the user must run.
pub fn setup() -> Result<(), String> {
    ensure_target()?;
    ensure_qemu()
}

fn ensure_target() -> Result<(), String> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("rustc: {e}"))?;
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if std::path::Path::new(&sysroot)
        .join("lib/rustlib")
        .join(TARGET)
        .exists()
    {
        return Ok(());
    }
    if !cmd::have("rustup") {
        return Err(format!(
            "the {TARGET} standard library is missing and rustup is not here: install it for {sysroot}"
        ));
    }
    println!("setup: rustup target add {TARGET}");
    cmd::run(Command::new("rustup").args(["target", "add", TARGET]))
        .map_err(|e| format!("{e}\nrun this yourself: rustup target add {TARGET}"))
}

fn ensure_qemu() -> Result<(), String> {
    if cmd::have(QEMU) {
        return Ok(());
    }
    let install = "apt-get update && apt-get install -y --no-install-recommends qemu-system-x86";
    if !is_root() || !cmd::have("apt-get") {
        return Err(format!("{QEMU} is missing; run this as root: {install}"));
    }
    println!("setup: {install}");
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    cmd::run(Command::new("apt-get").arg("update").envs(env))
        .and_then(|()| {
            cmd::run(
                Command::new("apt-get")
                    .args([
                        "install",
                        "-y",
                        "--no-install-recommends",
                        "qemu-system-x86",
                    ])
                    .envs(env),
            )
        })
        .map_err(|e| format!("{e}\nrun this as root: {install}"))?;
    if cmd::have(QEMU) {
        Ok(())
    } else {
        Err(format!(
            "{QEMU} still missing after installing; run: {install}"
        ))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}
