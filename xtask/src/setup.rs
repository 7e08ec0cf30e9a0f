//! `cargo xtask setup`: installs what `run` and `test` need, and nothing when it is all there.
//!
//! Rules: it never removes a package. Every `apt-get install` is simulated first (`apt-get -s`);
//! if the simulation would remove anything, setup refuses and prints the command for a person
//! to judge. On Debian 12 QEMU comes from bookworm-backports (10.x; the suite is added to the
//! sources when missing), because the release's QEMU 7.2 conflicts with the backports
//! `qemu-utils` such machines carry and apt would remove it; elsewhere from the release.

use std::{fs, path::Path, process::Command};

use crate::cmd;

/// The bare-metal target the kernel and the `no_std` builds use.
pub const TARGET: &str = "x86_64-unknown-none";
/// The QEMU binary the runner boots.
pub const QEMU: &str = "qemu-system-x86_64";

/// A program the suite runs, and the Debian package that ships it.
struct Tool {
    program: &'static str,
    package: &'static str,
    why: &'static str,
}

/// Everything `run` and `test` use from Debian besides QEMU.
const TOOLS: &[Tool] = &[
    Tool {
        program: "valgrind",
        package: "valgrind",
        why: "instruction budgets (callgrind)",
    },
    Tool {
        program: "trace-cmd",
        package: "trace-cmd",
        why: "`trace-cmd report` reads the kernel's trace.dat",
    },
    Tool {
        program: "xenstore-read",
        package: "xenstore-utils",
        why: "libxenstore's clients talk to the xenstore codec's test server",
    },
];

/// Where the backports suite is added on Debian 12 when no source names it.
const BACKPORTS_LIST: &str = "/etc/apt/sources.list.d/oskit-bookworm-backports.sources";

/// Installs the bare-metal Rust target and the Debian packages the suite uses, when missing.
/// When a step cannot be done here (not root, no apt, a removal), says which command to run.
pub fn setup() -> Result<(), String> {
    ensure_target()?;
    let mut missing: Vec<&Tool> = TOOLS.iter().filter(|t| !have(t.program)).collect();
    let need_qemu = !cmd::have(QEMU);
    if !need_qemu && missing.is_empty() {
        return Ok(());
    }
    if !is_root() || !cmd::have("apt-get") {
        let mut pkgs: Vec<&str> = missing.iter().map(|t| t.package).collect();
        if need_qemu {
            pkgs.push("qemu-system-x86");
        }
        return Err(format!(
            "missing: {}; run this as root: apt-get install --no-install-recommends {}",
            pkgs.join(", "),
            pkgs.join(" ")
        ));
    }
    let bookworm = os_codename().as_deref() == Some("bookworm");
    if need_qemu && bookworm {
        ensure_backports()?;
    }
    apt(&["update"])?;
    if need_qemu {
        if bookworm {
            install(&["-t", "bookworm-backports"], &["qemu-system-x86"])?;
        } else {
            install(&[], &["qemu-system-x86"])?;
        }
        if !cmd::have(QEMU) {
            return Err(format!(
                "{QEMU} still missing after installing qemu-system-x86"
            ));
        }
    }
    missing.retain(|t| !have(t.program));
    if !missing.is_empty() {
        for t in &missing {
            println!("setup: {} for {}", t.package, t.why);
        }
        let pkgs: Vec<&str> = missing.iter().map(|t| t.package).collect();
        install(&[], &pkgs)?;
    }
    Ok(())
}

/// Whether `program` is on the PATH (some tools have no `--version`).
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn ensure_target() -> Result<(), String> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("rustc: {e}"))?;
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if Path::new(&sysroot)
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

/// `VERSION_CODENAME` of `/etc/os-release`.
fn os_codename() -> Option<String> {
    let text = fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
}

/// Adds bookworm-backports to apt's sources unless some source already names it, with the
/// same mirror and keyring as the release's own entry.
fn ensure_backports() -> Result<(), String> {
    let mut sources = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".list") || name.ends_with(".sources") {
                sources += &fs::read_to_string(entry.path()).unwrap_or_default();
            }
        }
    }
    if sources
        .lines()
        .any(|l| !l.trim_start().starts_with('#') && l.contains("bookworm-backports"))
    {
        return Ok(());
    }
    let mirror = sources
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("http") && w.trim_end_matches('/').ends_with("/debian"))
        })
        .unwrap_or("http://deb.debian.org/debian")
        .to_string();
    let text = format!(
        "# Added by `cargo xtask setup` (oskit): QEMU 10 for Debian 12.\nTypes: deb\nURIs: {mirror}\n\
         Suites: bookworm-backports\nComponents: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    );
    println!("setup: adding bookworm-backports ({mirror}) as {BACKPORTS_LIST}");
    fs::write(BACKPORTS_LIST, text).map_err(|e| format!("{BACKPORTS_LIST}: {e}"))
}

fn apt(args: &[&str]) -> Result<(), String> {
    println!("setup: apt-get {}", args.join(" "));
    cmd::run(
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// `apt-get install` of `packages`, refused when apt would remove any package.
fn install(options: &[&str], packages: &[&str]) -> Result<(), String> {
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend_from_slice(options);
    args.extend_from_slice(packages);
    let shown = format!("apt-get {}", args.join(" "));
    let sim = Command::new("apt-get")
        .arg("-s")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .map_err(|e| format!("cannot start apt-get: {e}"))?;
    let text = String::from_utf8_lossy(&sim.stdout);
    if !sim.status.success() {
        return Err(format!(
            "`{shown}` would fail:\n{}{}",
            cmd::tail(&text, 10),
            String::from_utf8_lossy(&sim.stderr)
        ));
    }
    let removed = removals(&text);
    if !removed.is_empty() {
        return Err(format!(
            "setup will not remove packages, and `{shown}` would remove: {}\n\
             judge it and run it yourself if that is right",
            removed.join(", ")
        ));
    }
    apt(&args)
}

/// Packages an `apt-get -s` transcript removes (`Remv NAME [...]` lines).
fn removals(simulation: &str) -> Vec<String> {
    simulation
        .lines()
        .filter_map(|l| l.strip_prefix("Remv "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

#[cfg(test)]
mod tests {
    use super::removals;

    #[test]
    fn a_simulated_removal_is_found() {
        let sim = "Inst qemu-system-x86 (1:7.2+dfsg-7 Debian:12)\n\
                   Remv qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]\n\
                   Conf qemu-system-x86 (1:7.2+dfsg-7 Debian:12)\n";
        assert_eq!(removals(sim), ["qemu-utils"]);
        assert!(removals("Inst trace-cmd (3.1.5-1 Debian:12)\n").is_empty());
    }
}
