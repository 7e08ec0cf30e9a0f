//! Release checks in `cargo xtask test`: rustdoc clean under `-D warnings`, `cargo publish
//! --dry-run` of every crate, consumers' lockfiles free of test-only dependencies, and the
//! crates built and tested with the Rust version their `Cargo.toml` states.

use std::{collections::BTreeSet, fs, path::Path, process::Command};

use crate::{CRATES, cmd};

/// `cargo doc` of the workspace's crates with every feature, warnings denied, as on docs.rs
/// (whose `--cfg docsrs` needs nightly; the stable run checks links and docs).
pub fn rustdoc(log: &Path) -> Result<(), String> {
    let mut doc = cmd::cargo();
    doc.args(["doc", "--no-deps", "--all-features"])
        .args(CRATES.iter().flat_map(|c| ["-p".to_string(), package(c)]))
        .env("RUSTDOCFLAGS", "-D warnings");
    logged(&mut doc, log)
}

/// `cargo publish --dry-run` of each crate: packages it and builds the package alone.
pub fn publish_dry_run(log: &Path) -> Result<(), String> {
    for krate in CRATES {
        let mut publish = cmd::cargo();
        publish
            .args([
                "publish",
                "--dry-run",
                "--allow-dirty",
                "-p",
                &package(krate),
            ])
            .env("CARGO_TARGET_DIR", cmd::root().join("target/publish"));
        logged(&mut publish, &log.with_extension(format!("{krate}.log")))?;
        let listed = cmd::cargo()
            .args(["package", "--list", "--allow-dirty", "-p", &package(krate)])
            .output()
            .map_err(|e| e.to_string())?;
        let files = String::from_utf8_lossy(&listed.stdout);
        for needed in ["LICENSE-MIT", "LICENSE-APACHE", "README.md"] {
            if !files.lines().any(|f| f == needed) {
                return Err(format!("{} does not package {needed}", package(krate)));
            }
        }
    }
    Ok(())
}

/// For each crate, a scratch consumer (default features, then `x86`): its `Cargo.lock` must
/// hold exactly the packages `cargo tree` shows it builds (for any target), and no `loom`.
pub fn consumer_lockfiles(log: &Path) -> Result<(), String> {
    let base = cmd::root().join("target/consumers");
    let mut report = String::new();
    for krate in CRATES {
        for features in [&[][..], &["x86"]] {
            let dir = base.join(format!("{krate}-{}", features.join("-")));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("src")).map_err(|e| e.to_string())?;
            let manifest = format!(
                "[package]\nname = \"consumer\"\nversion = \"0.0.0\"\nedition = \"2024\"\n\
                 publish = false\n\n[workspace]\n\n[dependencies]\n{} = {{ path = {:?}, features = {:?} }}\n",
                package(krate),
                cmd::root().join("crates").join(krate),
                features
            );
            fs::write(dir.join("Cargo.toml"), manifest).map_err(|e| e.to_string())?;
            fs::write(dir.join("src/main.rs"), "fn main() {}\n").map_err(|e| e.to_string())?;
            let mut lock = Command::new(cargo_program());
            lock.current_dir(&dir).arg("generate-lockfile");
            logged(&mut lock, &log.with_extension("lock.log"))?;
            let locked =
                lock_names(&fs::read_to_string(dir.join("Cargo.lock")).unwrap_or_default());
            let tree = Command::new(cargo_program())
                .current_dir(&dir)
                .args([
                    "tree",
                    "--target",
                    "all",
                    "-e",
                    "normal,build",
                    "--prefix",
                    "none",
                ])
                .output()
                .map_err(|e| e.to_string())?;
            if !tree.status.success() {
                return Err(format!(
                    "cargo tree in {}: {}",
                    dir.display(),
                    String::from_utf8_lossy(&tree.stderr)
                ));
            }
            let built: BTreeSet<String> = String::from_utf8_lossy(&tree.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string)
                .collect();
            let extra: Vec<&String> = locked.difference(&built).collect();
            report += &format!(
                "{} features {:?}: {} locked, {} built, extra {:?}\n",
                package(krate),
                features,
                locked.len(),
                built.len(),
                extra
            );
            if !extra.is_empty() || locked.contains("loom") {
                let _ = fs::write(log, &report);
                return Err(format!(
                    "a consumer of {} with features {features:?} locks packages it never builds: {extra:?}",
                    package(krate)
                ));
            }
        }
    }
    fs::write(log, report).map_err(|e| e.to_string())
}

/// The crates' tests built and run with the `rust-version` each states (installed through
/// rustup when missing), in their own target directory.
pub fn msrv(log: &Path) -> Result<(), String> {
    let mut versions: Vec<(String, &str)> = Vec::new();
    for krate in CRATES {
        versions.push((rust_version(krate)?, krate));
    }
    for (version, krate) in versions {
        let have = Command::new("rustup")
            .args(["run", &version, "rustc", "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !have {
            let mut install = Command::new("rustup");
            install.args(["toolchain", "install", &version, "--profile", "minimal"]);
            logged(
                &mut install,
                &log.with_extension(format!("install-{version}.log")),
            )?;
        }
        // Every feature but the internal `loom` (whose dependency states a newer version).
        let features = features(krate)?.join(",");
        let mut test = Command::new("rustup");
        test.current_dir(cmd::root())
            .args(["run", &version, "cargo", "test", "-p", &package(krate)])
            .args(["--features", &features])
            .args(["--lib", "--tests", "--examples"])
            .env("CARGO_TARGET_DIR", cmd::root().join("target/msrv"))
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO");
        logged(&mut test, &log.with_extension(format!("{krate}.log")))?;
        println!("      {} tested with Rust {version}", package(krate));
    }
    Ok(())
}

/// The features a crate declares, without `default` and the internal `loom`.
pub fn features(krate: &str) -> Result<Vec<String>, String> {
    let manifest = fs::read_to_string(cmd::root().join("crates").join(krate).join("Cargo.toml"))
        .map_err(|e| e.to_string())?;
    Ok(manifest
        .lines()
        .skip_while(|l| l.trim() != "[features]")
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter_map(|l| l.split_once(" = ").map(|(name, _)| name.trim()))
        .filter(|name| !name.starts_with('#') && *name != "default" && *name != "loom")
        .map(str::to_string)
        .collect())
}

/// The `rust-version` of a crate: its own, or the workspace's.
fn rust_version(krate: &str) -> Result<String, String> {
    let value = |text: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix("rust-version = \""))
            .and_then(|v| v.split('"').next())
            .map(str::to_string)
    };
    let own = fs::read_to_string(cmd::root().join("crates").join(krate).join("Cargo.toml"))
        .map_err(|e| e.to_string())?;
    value(&own)
        .or_else(|| value(&fs::read_to_string(cmd::root().join("Cargo.toml")).ok()?))
        .ok_or(format!("no rust-version for {}", package(krate)))
}

/// Package names in a `Cargo.lock`, without the consumer itself.
fn lock_names(lock: &str) -> BTreeSet<String> {
    lock.lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "consumer")
        .map(str::to_string)
        .collect()
}

fn cargo_program() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn package(krate: &str) -> String {
    format!("oskit-{krate}")
}

fn logged(command: &mut Command, log: &Path) -> Result<(), String> {
    match cmd::run_logged(command, log)? {
        true => Ok(()),
        false => {
            let text = fs::read_to_string(log).unwrap_or_default();
            Err(format!(
                "`{}` failed:\n{}",
                cmd::display(command),
                cmd::tail(&text, 30)
            ))
        }
    }
}
