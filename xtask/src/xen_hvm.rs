//! The Xen HVM probe: boots the example kernel's `xen` scenario under QEMU's Xen HVM emulation
//! (QEMU ≥ 8 on a KVM with Xen support: `-accel kvm,xen-version=0x4000a,kernel-irqchip=split`).
//! Where this machine's KVM lacks it, QEMU says so ("Xen HVM guest support not present or
//! insufficient") and the stage is skipped with QEMU's own words.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{setup, suite::Outcome};

/// The stage's name.
pub const NAME: &str = "boot scenario=xen under Xen HVM emulation (KVM xen-version=0x4000a)";

/// The `-accel` argument that turns on QEMU's Xen HVM emulation (Xen 4.10's interface).
const ACCEL: &str = "kvm,xen-version=0x4000a,kernel-irqchip=split";
/// What isa-debug-exit makes of the kernel's success code.
const EXIT_SUCCESS: i32 = 33;
const TIMEOUT: Duration = Duration::from_secs(120);

/// Boots `kernel` with `scenario=xen` under Xen HVM emulation: passed when the kernel passes
/// and its real probe found Xen; skipped (with QEMU's or the system's reason) where KVM or its
/// Xen support is missing; failed otherwise.
pub fn stage(kernel: &Path, log: &Path) -> Outcome {
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Outcome::Skipped(format!("/dev/kvm: {e}"));
    }
    let mut qemu = Command::new(setup::QEMU);
    qemu.args(["-machine", "q35", "-m", "512M", "-smp", "2"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args([
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ])
        .arg("-kernel")
        .arg(kernel)
        .args(["-accel", ACCEL, "-cpu", "host", "-append", "scenario=xen"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match qemu.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("cannot start {}: {e}", setup::QEMU)),
    };
    let start = Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = match child.wait_with_output() {
        Ok(o) => o,
        Err(e) => return Outcome::Failed(format!("waiting for QEMU: {e}")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = fs::write(log, format!("{stdout}\n--- stderr ---\n{stderr}"));
    if let Some(line) = stderr
        .lines()
        .find(|l| l.contains("Xen HVM guest support") || l.contains("xen-version"))
    {
        return Outcome::Skipped(format!("QEMU: {}", line.trim()));
    }
    if start.elapsed() > TIMEOUT {
        return Outcome::Failed(format!(
            "the guest hung: killed after {} s",
            TIMEOUT.as_secs()
        ));
    }
    let passed = out.status.code() == Some(EXIT_SUCCESS) && stdout.contains("oskit-kernel: PASS");
    if !passed {
        return Outcome::Failed(format!(
            "QEMU exited {:?}: {}",
            out.status.code(),
            stderr.lines().chain(stdout.lines()).last().unwrap_or("")
        ));
    }
    if !stdout.contains("real probe: Xen") {
        return Outcome::Failed("the kernel passed but its real probe did not find Xen".into());
    }
    Outcome::Passed
}
