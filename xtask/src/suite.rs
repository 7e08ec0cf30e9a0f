//! `cargo xtask test` (the suite CI runs) and the slow campaigns: `fuzz`, `bench`, `miri`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use crate::{
    CRATES, budgets, cmd,
    qemu::{self, Accel, RunOptions},
    release, setup,
};

/// How one stage ended.
pub(crate) enum Outcome {
    Passed,
    Failed(String),
    Skipped(String),
}

/// Stages run so far, and where their logs go.
struct Suite {
    passed: usize,
    failed: usize,
    skipped: usize,
    logs: PathBuf,
}

impl Suite {
    fn new() -> Self {
        let logs = cmd::root().join("target").join("xtask-logs");
        let _ = fs::remove_dir_all(&logs);
        Self {
            passed: 0,
            failed: 0,
            skipped: 0,
            logs,
        }
    }

    /// Runs one stage and prints its line: result, name, time, and on failure why.
    fn stage(&mut self, name: &str, run: impl FnOnce(&Path) -> Outcome) {
        let log = self.logs.join(format!(
            "{}.log",
            name.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
        ));
        let start = Instant::now();
        let outcome = run(&log);
        let secs = start.elapsed().as_secs_f64();
        match outcome {
            Outcome::Passed => {
                self.passed += 1;
                println!("PASS  {name} ({secs:.1} s)");
            }
            Outcome::Skipped(why) => {
                self.skipped += 1;
                println!("SKIP  {name}: skipped: {why}");
            }
            Outcome::Failed(why) => {
                self.failed += 1;
                println!("FAIL  {name} ({secs:.1} s): {why}");
                if let Ok(text) = fs::read_to_string(&log) {
                    for line in cmd::tail(&text, 40).lines() {
                        println!("    | {line}");
                    }
                    println!("    (whole log: {})", log.display());
                }
            }
        }
    }

    /// A stage that is one command, passing when it exits 0.
    fn command(&mut self, name: &str, mut command: Command) {
        self.stage(name, |log| match cmd::run_logged(&mut command, log) {
            Ok(true) => Outcome::Passed,
            Ok(false) => Outcome::Failed(format!("`{}` failed", cmd::display(&command))),
            Err(why) => Outcome::Failed(why),
        });
    }
}

fn package(krate: &str) -> String {
    format!("oskit-{krate}")
}

fn cargo(args: &[&str]) -> Command {
    let mut c = cmd::cargo();
    c.args(args);
    c
}

/// Name prefix of the tests that run against a real peer (the live kernel, KVM, a Linux tool).
/// Such a test that cannot reach its peer prints a line `skipped: <reason>` and returns.
const PEER_PREFIX: &str = "peer_";

/// Runs a crate's `peer_*` tests one at a time: failed if any fails; skipped (with the reasons)
/// when every one of them printed `skipped:`; otherwise passed, listing the ones that skipped.
fn peer_stage(krate: &str, log: &Path) -> Outcome {
    let mut test = cargo(&[
        "test",
        "-p",
        &package(krate),
        "--all-features",
        PEER_PREFIX,
        "--",
        "--nocapture",
        "--test-threads=1",
    ]);
    match cmd::run_logged(&mut test, log) {
        Ok(true) => {}
        Ok(false) => return Outcome::Failed(format!("`{}` failed", cmd::display(&test))),
        Err(why) => return Outcome::Failed(why),
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    let ran: usize = text
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
        .sum();
    let skipped: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once("skipped: ").map(|(_, why)| why))
        .collect();
    if ran == 0 {
        Outcome::Skipped("the crate has no peer_* test".into())
    } else if skipped.len() >= ran {
        Outcome::Skipped(skipped.join("; "))
    } else {
        for why in &skipped {
            println!("      (one of {ran} peer tests skipped: {why})");
        }
        Outcome::Passed
    }
}

/// `cargo xtask test`.
pub fn test() -> Result<(), String> {
    setup::setup()?;
    let root = cmd::root();
    let mut suite = Suite::new();
    let started = Instant::now();

    for krate in CRATES {
        // Tests against a real peer (`peer_*`) run in their own stage below, where a missing
        // peer is reported as skipped instead of passing.
        suite.command(
            &format!("host tests {}", package(krate)),
            cargo(&[
                "test",
                "-p",
                &package(krate),
                "--all-features",
                "--",
                "--skip",
                PEER_PREFIX,
            ]),
        );
    }
    for krate in CRATES {
        suite.stage(&format!("real peers {}", package(krate)), |log| {
            peer_stage(krate, log)
        });
    }
    suite.command("host tests xtask", cargo(&["test", "-p", "xtask"]));

    for krate in CRATES {
        let name = format!("loom {}", package(krate));
        if !root
            .join("crates")
            .join(krate)
            .join("tests/loom.rs")
            .exists()
        {
            suite.stage(&name, |_| {
                Outcome::Skipped("the crate has no tests/loom.rs".into())
            });
            continue;
        }
        let mut loom = cargo(&[
            "test",
            "-p",
            &package(krate),
            "--release",
            "--features",
            "loom",
            "--test",
            "loom",
        ]);
        loom.env("RUSTFLAGS", "--cfg loom")
            .env("LOOM_MAX_PREEMPTIONS", "2")
            // Loom needs speed, not symbols: a release build without debuginfo compiles faster.
            .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
            .env("CARGO_TARGET_DIR", root.join("target").join("loom"));
        suite.command(&name, loom);
    }

    for krate in CRATES {
        suite.stage(
            &format!("no_std build {} (none; x86)", package(krate)),
            |log| {
                for features in [&["--no-default-features"][..], &["--features", "x86"]] {
                    let mut build =
                        cargo(&["build", "-p", &package(krate), "--target", setup::TARGET]);
                    build.args(features);
                    match cmd::run_logged(&mut build, log) {
                        Ok(true) => {}
                        Ok(false) => {
                            return Outcome::Failed(format!("`{}` failed", cmd::display(&build)));
                        }
                        Err(why) => return Outcome::Failed(why),
                    }
                }
                Outcome::Passed
            },
        );
    }
    suite.command(
        "clippy oskit-example-kernel (x86_64-unknown-none)",
        cargo(&[
            "clippy",
            "-p",
            "oskit-example-kernel",
            "--target",
            setup::TARGET,
            "--",
            "-D",
            "warnings",
        ]),
    );

    let mut corpora = cargo(&["test", "--no-default-features"]);
    corpora.current_dir(root.join("fuzz"));
    suite.command("fuzz corpora (stable replay)", corpora);

    for krate in CRATES {
        let name = format!("bench smoke {}", package(krate));
        if !root.join("crates").join(krate).join("benches").exists() {
            suite.stage(&name, |_| {
                Outcome::Skipped("the crate has no benches/".into())
            });
            continue;
        }
        suite.command(&name, cargo(&["test", "-p", &package(krate), "--benches"]));
    }

    suite.stage("instruction budgets (callgrind)", budget_stage);

    release_stages(&mut suite);

    boot_stages(&mut suite);

    println!(
        "test: all stages took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    // The closing line stands alone, in the plain `N passed, N failed, N skipped` form.
    println!(
        "test: {} passed, {} failed, {} skipped",
        suite.passed, suite.failed, suite.skipped
    );
    if suite.failed == 0 {
        Ok(())
    } else {
        Err(format!("{} stage(s) failed", suite.failed))
    }
}

/// A check that writes its log and says why it failed.
type Check = fn(&Path) -> Result<(), String>;

/// The release checks (`xtask/src/release.rs`), a stage each.
fn release_stages(suite: &mut Suite) {
    let checks: [(&str, Check); 4] = [
        ("rustdoc -D warnings (all features)", release::rustdoc),
        (
            "cargo publish --dry-run (each crate)",
            release::publish_dry_run,
        ),
        (
            "consumer lockfiles hold only real dependencies",
            release::consumer_lockfiles,
        ),
        ("MSRV: tests with each crate's rust-version", release::msrv),
    ];
    for (name, check) in checks {
        suite.stage(name, |log| match check(log) {
            Ok(()) => Outcome::Passed,
            Err(why) => Outcome::Failed(why),
        });
    }
}

/// `cargo xtask release`: the release checks alone.
pub fn release_checks() -> Result<(), String> {
    let mut suite = Suite::new();
    release_stages(&mut suite);
    println!("release: {} passed, {} failed", suite.passed, suite.failed);
    if suite.failed == 0 {
        Ok(())
    } else {
        Err(format!("{} release check(s) failed", suite.failed))
    }
}

/// The QEMU boots: the full scenario on TCG with 1 vCPU and with the default count (and on KVM
/// where it works), and the deliberate failures, each of which must turn the run red with its
/// own message.
fn boot_stages(suite: &mut Suite) {
    let mut kernel = None;
    suite.stage("build oskit-example-kernel", |log| {
        let mut build = cargo(&[
            "build",
            "--release",
            "-p",
            "oskit-example-kernel",
            "--target",
            setup::TARGET,
        ]);
        match cmd::run_logged(&mut build, log) {
            Ok(true) => {
                kernel = Some(
                    cmd::root()
                        .join("target")
                        .join(setup::TARGET)
                        .join("release/oskit-example-kernel"),
                );
                Outcome::Passed
            }
            Ok(false) => Outcome::Failed("the kernel does not build".into()),
            Err(why) => Outcome::Failed(why),
        }
    });
    let Some(kernel) = kernel else { return };

    let boot = |accel, smp: u32, scenario: Option<&str>, log: &Path| {
        let opts = RunOptions {
            accel: Some(accel),
            smp,
            scenario: scenario.map(str::to_string),
            // kvm_pvm runs the guest's ring 0 through KVM's instruction emulator: the full
            // scenario takes 45-90 s there (measured, quiet machine; under 10 s on TCG), and a
            // loaded CI host can stretch that several times.
            timeout: if accel == Accel::Kvm {
                std::time::Duration::from_secs(1200)
            } else {
                RunOptions::default().timeout
            },
            ..RunOptions::default()
        };
        let result = qemu::boot(&kernel, &opts, false);
        if let Ok(b) = &result {
            let _ = fs::write(log, &b.log);
        }
        result
    };
    let default_smp = RunOptions::default().smp;
    // The kernel's trace from the last full TCG boot, for the trace-cmd stage.
    let mut kernel_trace = None;
    // The full scenario on one vCPU and on several: SMP bring-up must not be what makes it pass.
    for smp in [1, default_smp] {
        suite.stage(
            &format!("boot scenario=all smp={smp} (TCG)"),
            |log| match boot(Accel::Tcg, smp, None, log) {
                Ok(b) if b.passed => {
                    kernel_trace = b.trace;
                    Outcome::Passed
                }
                Ok(b) => Outcome::Failed(b.failure.unwrap_or_default()),
                Err(why) => Outcome::Failed(why),
            },
        );
    }
    suite.stage(
        "trace-cmd report of the kernel's trace (TCG boot)",
        // (`trace-cmd --version` exits with 255: whether it runs at all is the test.)
        |log| match (
            &kernel_trace,
            Command::new("trace-cmd").arg("--version").output().is_ok(),
        ) {
            (None, _) => Outcome::Skipped("no passing boot with a trace dump".into()),
            (_, false) => Outcome::Skipped("trace-cmd is not installed".into()),
            (Some(trace), true) => {
                let dat = log.with_extension("dat");
                match crate::tracedump::check_with_trace_cmd(trace, &dat) {
                    Ok(summary) => {
                        let _ = fs::write(log, summary);
                        Outcome::Passed
                    }
                    Err(why) => Outcome::Failed(why),
                }
            }
        },
    );
    // The same under KVM: skipped only where /dev/kvm cannot be opened (a KVM that accepts no
    // CPU model, or cannot run the guest, fails).
    for smp in [1, default_smp] {
        suite.stage(
            &format!("boot scenario=all smp={smp} (KVM)"),
            |log| match qemu::kvm_available() {
                Err(why) => Outcome::Skipped(why),
                Ok(()) => match boot(Accel::Kvm, smp, None, log) {
                    Ok(b) if b.passed => {
                        if qemu::kvm_flavour() == "kvm_pvm" {
                            let (arg, why) = qemu::KVM_PVM_ARGS;
                            println!("      ({arg}: {why})");
                        }
                        Outcome::Passed
                    }
                    Ok(b) => Outcome::Failed(b.failure.unwrap_or_default()),
                    Err(why) => Outcome::Failed(why),
                },
            },
        );
    }
    // Real async page faults from this KVM, counted by the guest and by the host's
    // tracepoints for the same run (see apfreal.rs).
    suite.stage(
        "boot scenario=apf-real smp=2 (KVM, host evicts guest RAM)",
        |log| match crate::apfreal::available() {
            Err(why) => Outcome::Skipped(why),
            Ok(()) => match crate::apfreal::run(&kernel) {
                Ok(report) => {
                    let _ = fs::write(log, &report.log);
                    for line in &report.lines {
                        println!("      {line}");
                    }
                    match report.failure {
                        None => Outcome::Passed,
                        Some(why) => Outcome::Failed(why),
                    }
                }
                Err(why) => Outcome::Failed(why),
            },
        },
    );
    suite.stage(crate::xen_hvm::NAME, |log| {
        crate::xen_hvm::stage(&kernel, log)
    });
    let red = [
        (
            "fail-check",
            "check deliberate-failure ... FAILED: this check fails on purpose",
        ),
        ("panic", "PANIC: panicked at"),
        ("exception", "EXCEPTION: #UD invalid opcode (vector 6)"),
        ("stack-overflow", "EXCEPTION: #DF double fault (vector 8)"),
        // The apf step counts the wakes each task receives: a duplicate fails it.
        ("apf-double-wake", "check apf ... FAILED: task slot"),
    ];
    for (scenario, expected) in red {
        suite.stage(
            &format!("boot scenario={scenario} turns the run red (TCG)"),
            |log| match boot(Accel::Tcg, default_smp, Some(scenario), log) {
                Ok(b) if b.passed => Outcome::Failed("the run passed".into()),
                Ok(b) => match b.failure {
                    Some(why) if why.contains(expected) => Outcome::Passed,
                    why => Outcome::Failed(format!("failed, but not with `{expected}`: {why:?}")),
                },
                Err(why) => Outcome::Failed(why),
            },
        );
    }
}

/// The instruction budgets as a stage: skipped without valgrind or without budgets.
fn budget_stage(log: &Path) -> Outcome {
    let list = match fs::read_to_string(budgets::path())
        .map_err(|e| e.to_string())
        .and_then(|t| budgets::parse(&t))
    {
        Ok(list) => list,
        Err(why) => return Outcome::Failed(format!("xtask/budgets.txt: {why}")),
    };
    if list.is_empty() {
        return Outcome::Skipped("xtask/budgets.txt lists no budget".into());
    }
    if !cmd::have("valgrind") {
        return Outcome::Skipped("valgrind is not installed (apt-get install valgrind)".into());
    }
    let (ok, lines) = match budgets::check(&list) {
        Ok(lines) => (true, lines),
        Err(lines) => (false, lines),
    };
    let _ = fs::write(log, lines.join("\n") + "\n");
    for line in &lines {
        println!("      {line}");
    }
    if ok {
        Outcome::Passed
    } else {
        Outcome::Failed("a hot path is over its instruction budget".into())
    }
}

/// `cargo xtask budgets`: measure and check the instruction budgets.
pub fn budgets() -> Result<(), String> {
    if !cmd::have("valgrind") {
        return Err("valgrind is not installed: apt-get install valgrind".into());
    }
    let list = budgets::parse(&fs::read_to_string(budgets::path()).map_err(|e| e.to_string())?)?;
    match budgets::check(&list) {
        Ok(lines) => {
            lines.iter().for_each(|l| println!("{l}"));
            Ok(())
        }
        Err(lines) => {
            lines.iter().for_each(|l| println!("{l}"));
            Err("a hot path is over its instruction budget".into())
        }
    }
}

/// Names of the cargo-fuzz targets (the `[[bin]]`s of `fuzz/Cargo.toml`).
fn fuzz_targets() -> Result<Vec<String>, String> {
    let manifest = fs::read_to_string(cmd::root().join("fuzz/Cargo.toml"))
        .map_err(|e| format!("fuzz/Cargo.toml: {e}"))?;
    Ok(manifest
        .lines()
        .filter_map(|l| {
            l.strip_prefix("name = \"")?
                .strip_suffix('"')
                .map(str::to_string)
        })
        .filter(|n| n != "oskit-fuzz")
        .collect())
}

/// The nightly toolchain's cargo, through rustup: `cargo +nightly` is a rustup-proxy feature,
/// and inside `cargo xtask` the `cargo` on the PATH may be the stable toolchain's own binary.
fn nightly_cargo() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC");
    c
}

fn ensure_nightly(components: &[&str]) -> Result<(), String> {
    let have = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    if !components.is_empty() {
        cmd::run(
            Command::new("rustup")
                .args(["component", "add", "--toolchain", "nightly"])
                .args(components),
        )?;
    }
    Ok(())
}

/// `cargo xtask fuzz [TARGET] [--seconds N]`: each target (all by default) for N seconds (10).
pub fn fuzz(args: &[String]) -> Result<(), String> {
    let mut seconds = 10u64;
    let mut only = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .ok_or("--seconds needs a value")?
                    .parse()
                    .map_err(|e| format!("--seconds: {e}"))?
            }
            name if !name.starts_with('-') && only.is_none() => only = Some(name.to_string()),
            other => return Err(format!("unknown option `{other}` for fuzz")),
        }
    }
    ensure_nightly(&[])?;
    if !cmd::have("cargo-fuzz") {
        cmd::run(cmd::cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let targets = fuzz_targets()?;
    let chosen: Vec<&String> = match &only {
        Some(name) => {
            let t = targets.iter().find(|t| *t == name).ok_or(format!(
                "no fuzz target `{name}`; have: {}",
                targets.join(", ")
            ))?;
            vec![t]
        }
        None => targets.iter().collect(),
    };
    let root = cmd::root();
    for target in chosen {
        // New inputs go to a scratch corpus; the committed one is only read.
        let scratch = root.join("target/fuzz-corpus").join(target);
        fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
        println!("fuzz: {target} for {seconds} s");
        let mut run = nightly_cargo();
        run.current_dir(root.join("fuzz"))
            .args(["fuzz", "run", target])
            .arg(&scratch)
            .arg(root.join("fuzz/corpus").join(target))
            .args(["--", &format!("-max_total_time={seconds}")]);
        cmd::run(&mut run)?;
    }
    Ok(())
}

/// `cargo xtask bench [CRATE] [--report]`: the criterion benches of one crate or all; with
/// `--report`, BENCHMARKS.md too.
pub fn bench(args: &[String]) -> Result<(), String> {
    let report = args.iter().any(|a| a == "--report");
    let args: Vec<String> = args.iter().filter(|a| *a != "--report").cloned().collect();
    let crates = chosen_crates(&args)?;
    if report {
        let path = crate::report::bench_report(&crates)?;
        println!("bench: wrote {}", path.display());
        return Ok(());
    }
    for krate in crates {
        if cmd::root()
            .join("crates")
            .join(krate)
            .join("benches")
            .exists()
        {
            let mut bench = cargo(&["bench", "-p", &package(krate)]);
            bench.args(crate::budgets::extra_features(krate));
            cmd::run(&mut bench)?;
        } else {
            println!("bench: {} has no benches", package(krate));
        }
    }
    Ok(())
}

/// `cargo xtask miri [CRATE]`: the crates' tests under Miri.
pub fn miri(args: &[String]) -> Result<(), String> {
    ensure_nightly(&["miri", "rust-src"])?;
    for krate in chosen_crates(args)? {
        let mut miri = nightly_cargo();
        miri.current_dir(cmd::root())
            .args(["miri", "test", "-p", &package(krate)])
            .args(["--features", &release::features(krate)?.join(",")])
            .env("CARGO_TARGET_DIR", cmd::root().join("target/miri"));
        cmd::run(&mut miri)?;
    }
    Ok(())
}

fn chosen_crates(args: &[String]) -> Result<Vec<&'static str>, String> {
    match args {
        [] => Ok(CRATES.to_vec()),
        [name] => {
            let name = name.strip_prefix("oskit-").unwrap_or(name);
            CRATES
                .iter()
                .find(|c| **c == name)
                .map(|c| vec![*c])
                .ok_or(format!("no crate `{name}`; have: {}", CRATES.join(", ")))
        }
        _ => Err("expected at most one crate name".into()),
    }
}

/// `cargo xtask stress [SECS]`: the nested-writer stress of oskit-ring-buffer (signal handlers
/// as interrupt and NMI writers, both modes, with and without a consumer), SECS seconds per
/// configuration (60 by default; `cargo xtask test` runs it for under a second each).
pub fn stress(args: &[String]) -> Result<(), String> {
    let secs = match args {
        [] => "60".to_string(),
        [s] if s.parse::<f64>().is_ok_and(|v| v > 0.0) => s.clone(),
        _ => return Err("usage: cargo xtask stress [SECS]".into()),
    };
    cmd::run(
        cargo(&[
            "test",
            "--release",
            "-p",
            "oskit-ring-buffer",
            "--test",
            "nested_stress",
            "--",
            "--nocapture",
        ])
        .env("OSKIT_STRESS_SECS", secs),
    )
}
