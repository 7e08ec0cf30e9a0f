//! Instruction budgets of the hot paths, measured deterministically with callgrind.
//!
//! `xtask/budgets.txt` lists `CRATE PROBE BUDGET [BASELINE]`, one per line. Each crate's
//! `examples/icount.rs` (built in release) runs a probe as `icount PROBE ITERS`, calling the
//! `#[inline(never)]`, `#[no_mangle]` function `icount_PROBE` that performs the operation ITERS
//! times. Callgrind counts instructions only inside that function (and its callees); the cost of
//! one operation is the count at 2N minus the count at N, over N, so set-up done once per call
//! cancels out. With a BASELINE probe, the budget bounds the difference between the two (for
//! "extra instructions a hook adds").

use std::{fs, path::PathBuf, process::Command};

use crate::cmd;

/// Operations per measurement (the second one runs twice as many).
const ITERS: u64 = 1000;

/// One line of `budgets.txt`.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// Crate folder under `crates/`.
    pub krate: String,
    /// Probe name (`icount_<probe>` in the crate's `examples/icount.rs`).
    pub probe: String,
    /// Most instructions one operation may take.
    pub budget: f64,
    /// A probe whose cost is subtracted first.
    pub baseline: Option<String>,
}

/// Parses `budgets.txt` (`#` comments, blank lines ignored).
pub fn parse(text: &str) -> Result<Vec<Budget>, String> {
    let mut budgets = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let [krate, probe, budget, rest @ ..] = words.as_slice() else {
            return Err(format!(
                "budgets.txt:{}: expected `CRATE PROBE BUDGET [BASELINE]`",
                n + 1
            ));
        };
        let budget: f64 = budget
            .parse()
            .map_err(|e| format!("budgets.txt:{}: budget: {e}", n + 1))?;
        let baseline = match rest {
            [] => None,
            [b] => Some(b.to_string()),
            _ => return Err(format!("budgets.txt:{}: too many fields", n + 1)),
        };
        budgets.push(Budget {
            krate: krate.to_string(),
            probe: probe.to_string(),
            budget,
            baseline,
        });
    }
    Ok(budgets)
}

/// The budgets file.
pub fn path() -> PathBuf {
    cmd::root().join("xtask").join("budgets.txt")
}

/// Builds `krate`'s icount example (release) and returns the binary.
fn build_probe(krate: &str) -> Result<PathBuf, String> {
    let mut build = cmd::cargo();
    build.args([
        "build",
        "--quiet",
        "--release",
        "-p",
        &format!("oskit-{krate}"),
        "--example",
        "icount",
    ]);
    build.args(extra_features(krate));
    let out = build.output().map_err(|e| format!("cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{}` failed:\n{}",
            cmd::display(&build),
            cmd::tail(&String::from_utf8_lossy(&out.stderr), 20)
        ));
    }
    Ok(cmd::root().join("target/release/examples/icount"))
}

/// Features a crate's icount example and benches need beyond its defaults (pte-batch: the real
/// x86-64 walker's probes and bench group).
pub fn extra_features(krate: &str) -> &'static [&'static str] {
    match krate {
        "pte-batch" => &["--features", "x86"],
        _ => &[],
    }
}

/// Instructions callgrind counts inside `icount_<probe>` for `iters` operations.
fn count(binary: &PathBuf, probe: &str, iters: u64) -> Result<u64, String> {
    let out_file = cmd::root()
        .join("target")
        .join(format!("callgrind.{probe}.{iters}.out"));
    let out = Command::new("valgrind")
        .args(["--tool=callgrind", "--quiet"])
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(format!("--toggle-collect=icount_{probe}"))
        .arg(binary)
        .args([probe, &iters.to_string()])
        .output()
        .map_err(|e| format!("valgrind: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "probe {probe} failed under callgrind:\n{}",
            cmd::tail(&String::from_utf8_lossy(&out.stderr), 10)
        ));
    }
    let text = fs::read_to_string(&out_file).map_err(|e| format!("{}: {e}", out_file.display()))?;
    let _ = fs::remove_file(&out_file);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or(format!(
            "no instruction total in callgrind's output for {probe}"
        ))
}

/// Instructions per operation of one probe.
pub fn per_op(binary: &PathBuf, probe: &str) -> Result<f64, String> {
    let once = count(binary, probe, ITERS)?;
    let twice = count(binary, probe, 2 * ITERS)?;
    if once == 0 {
        return Err(format!(
            "callgrind counted nothing in icount_{probe}: is it #[no_mangle] and #[inline(never)]?"
        ));
    }
    Ok(twice.saturating_sub(once) as f64 / ITERS as f64)
}

/// Whether `icount_<a>` and `icount_<b>` are one function (the compiler merged identical code).
fn same_address(binary: &PathBuf, a: &str, b: &str) -> bool {
    let Ok(out) = Command::new("nm").arg(binary).output() else {
        return false;
    };
    let symbols = String::from_utf8_lossy(&out.stdout);
    let address = |name: &str| {
        let wanted = format!("icount_{name}");
        symbols.lines().find_map(|l| {
            let mut words = l.split_whitespace();
            let (addr, _, sym) = (words.next()?, words.next()?, words.next()?);
            (sym == wanted).then(|| addr.to_string())
        })
    };
    matches!((address(a), address(b)), (Some(x), Some(y)) if x == y)
}

/// Measures every budget; `Ok(lines)` when all hold, `Err(lines)` naming each one exceeded.
pub fn check(budgets: &[Budget]) -> Result<Vec<String>, Vec<String>> {
    let mut lines = Vec::new();
    let mut over = false;
    let mut binaries: Vec<(String, Result<PathBuf, String>)> = Vec::new();
    for b in budgets {
        if !binaries.iter().any(|(k, _)| *k == b.krate) {
            binaries.push((b.krate.clone(), build_probe(&b.krate)));
        }
        let binary = match &binaries
            .iter()
            .find(|(k, _)| *k == b.krate)
            .expect("just built")
            .1
        {
            Ok(binary) => binary,
            Err(why) => {
                over = true;
                lines.push(format!(
                    "{} {}: cannot build the probe: {why}",
                    b.krate, b.probe
                ));
                continue;
            }
        };
        let measured = match &b.baseline {
            // Identical code folded to one address: the difference is zero by construction
            // (and callgrind would attribute both to one name).
            Some(base) if same_address(binary, &b.probe, base) => Ok(0.0),
            Some(base) => per_op(binary, &b.probe)
                .and_then(|cost| per_op(binary, base).map(|base_cost| cost - base_cost)),
            None => per_op(binary, &b.probe),
        };
        let what = match &b.baseline {
            Some(base) => format!("{} {} (minus {base})", b.krate, b.probe),
            None => format!("{} {}", b.krate, b.probe),
        };
        match measured {
            Ok(cost) if cost <= b.budget => lines.push(format!(
                "{what}: {cost:.1} instructions/op (budget {})",
                b.budget
            )),
            Ok(cost) => {
                over = true;
                lines.push(format!(
                    "{what}: {cost:.1} instructions/op EXCEEDS its budget of {}; if that is on purpose, raise it in xtask/budgets.txt and say why in the commit",
                    b.budget
                ));
            }
            Err(why) => {
                over = true;
                lines.push(format!("{what}: {why}"));
            }
        }
    }
    if over { Err(lines) } else { Ok(lines) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_budgets_and_rejects_bad_lines() {
        let b = parse("# comment\n\nring-buffer reserve_commit_16 120\npv-apf hook_runtime 2 hook_none # extra\n").unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].probe, "reserve_commit_16");
        assert_eq!(b[0].budget, 120.0);
        assert_eq!(b[1].baseline.as_deref(), Some("hook_none"));
        assert!(parse("ring-buffer only_two\n").is_err());
        assert!(parse("a b notanumber\n").is_err());
        assert!(parse("a b 1 c d\n").is_err());
    }
}
