//! `cargo xtask bench --report`: every crate's criterion benches, summarised in BENCHMARKS.md.
//!
//! Convention: in each criterion group, the entries whose function id starts with `oskit` are
//! ours; every other entry of the group (a peer crate, a ceiling such as memcpy, a reference
//! implementation) is compared with them, and the ratio ours/theirs is the headline.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{CRATES, cmd};

/// One measured benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// Criterion group.
    pub group: String,
    /// Function id within the group (`oskit…` for ours).
    pub function: String,
    /// Parameter (`value_str`), empty when none.
    pub value: String,
    /// Median time per iteration, in nanoseconds.
    pub median_ns: f64,
}

/// Finds the string value of `"key":"…"` in a small JSON object (criterion's own files).
fn json_str(json: &str, key: &str) -> Option<String> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = json[at..].trim_start();
    let rest = rest.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => out.push(chars.next()?),
            c => out.push(c),
        }
    }
    None
}

/// The median's point estimate in criterion's `estimates.json`.
fn median(json: &str) -> Option<f64> {
    let at = json.find("\"median\"")?;
    let rest = &json[at..];
    let at = rest.find("\"point_estimate\":")? + "\"point_estimate\":".len();
    let num: String = rest[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
        .collect();
    num.parse().ok()
}

/// Reads every `new/benchmark.json` + `new/estimates.json` pair below `dir`.
pub fn collect(dir: &Path) -> Vec<Measurement> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == "new") {
                    if let Some(m) = read_one(&path) {
                        found.push(m);
                    }
                } else {
                    stack.push(path);
                }
            }
        }
    }
    found.sort_by(|a, b| (&a.group, &a.value, &a.function).cmp(&(&b.group, &b.value, &b.function)));
    found
}

fn read_one(new: &Path) -> Option<Measurement> {
    let bench = fs::read_to_string(new.join("benchmark.json")).ok()?;
    let estimates = fs::read_to_string(new.join("estimates.json")).ok()?;
    Some(Measurement {
        group: json_str(&bench, "group_id")?,
        function: json_str(&bench, "function_id").unwrap_or_default(),
        value: json_str(&bench, "value_str").unwrap_or_default(),
        median_ns: median(&estimates)?,
    })
}

fn human(ns: f64) -> String {
    match ns {
        n if n >= 1e9 => format!("{:.2} s", n / 1e9),
        n if n >= 1e6 => format!("{:.2} ms", n / 1e6),
        n if n >= 1e3 => format!("{:.2} µs", n / 1e3),
        n => format!("{n:.1} ns"),
    }
}

/// The markdown table of one crate: each of our entries against every other entry measured
/// with the same group and parameter.
pub fn table(measurements: &[Measurement]) -> String {
    let mut out = String::from(
        "| group | parameter | oskit | median | compared with | its median | ratio (oskit / it) |\n|---|---|---|---|---|---|---|\n",
    );
    let mut rows = 0;
    for ours in measurements
        .iter()
        .filter(|m| m.function.starts_with("oskit"))
    {
        let peers = measurements.iter().filter(|m| {
            m.group == ours.group && m.value == ours.value && !m.function.starts_with("oskit")
        });
        let mut any = false;
        for peer in peers {
            any = true;
            rows += 1;
            out += &format!(
                "| {} | {} | {} | {} | {} | {} | {:.2}× |\n",
                ours.group,
                ours.value,
                ours.function,
                human(ours.median_ns),
                peer.function,
                human(peer.median_ns),
                ours.median_ns / peer.median_ns
            );
        }
        if !any {
            rows += 1;
            out += &format!(
                "| {} | {} | {} | {} | — | — | — |\n",
                ours.group,
                ours.value,
                ours.function,
                human(ours.median_ns)
            );
        }
    }
    if rows == 0 {
        out += "| (no benchmark with an `oskit…` function id) | | | | | | |\n";
    }
    out
}

/// The machine lines of a section: CPU and cores, kernel, compiler.
fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let out = |c: &mut Command| {
        c.output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let kernel = out(Command::new("uname").arg("-sr"));
    let rustc = out(Command::new("rustc").arg("--version"));
    format!("- CPU: {cpu}, {cores} cores available\n- kernel: {kernel}\n- compiler: {rustc}\n")
}

/// The opening of BENCHMARKS.md, before the machine and the crates' sections.
const PREAMBLE: &str = "# Benchmarks\n\n\
Written by `cargo xtask bench --report`, a section per crate, each from one run (its first\n\
line says when and on which machine; a run of some crates replaces only their sections). The\n\
ratios are the headline (oskit against the peer crate, reference or physical ceiling measured\n\
in the same group, in the same run); absolute times hold for that machine only.\n";

/// BENCHMARKS.md with the sections of `fresh` (`(package, body)`, body without its `## `
/// heading) put in place of the same packages' sections of `old`; the other sections of `old`
/// are kept as they are, in the order of `order` (packages), any others after them. `head`
/// replaces what comes before the first section.
fn splice(old: &str, fresh: &[(String, String)], head: &str, order: &[String]) -> String {
    let mut sections: Vec<(String, String)> = Vec::new();
    // `old`'s sections: from each line `## name` to the next one.
    let mut current: Option<(String, String)> = None;
    for line in old.lines() {
        if let Some(name) = line.strip_prefix("## ") {
            sections.extend(current.take());
            current = Some((name.trim().to_string(), String::new()));
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    sections.extend(current);
    for (package, body) in fresh {
        match sections.iter_mut().find(|(name, _)| name == package) {
            Some(old) => old.1 = body.clone(),
            None => sections.push((package.clone(), body.clone())),
        }
    }
    let rank = |name: &str| order.iter().position(|p| p == name).unwrap_or(order.len());
    sections.sort_by_key(|(name, _)| rank(name));
    let mut doc = head.to_string();
    for (name, body) in &sections {
        doc += &format!("\n## {name}\n\n{}\n", body.trim());
    }
    doc
}

/// Today's date (UTC), for a section's first line.
fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "(date unknown)".into())
}

/// Runs the benches of `crates` with criterion writing into a fresh directory, then rewrites
/// their sections of BENCHMARKS.md at the workspace root (the other crates' sections stay).
pub fn bench_report(crates: &[&str]) -> Result<PathBuf, String> {
    let root = cmd::root();
    let mut fresh = Vec::new();
    for krate in crates.iter().filter(|c| CRATES.contains(c)) {
        let package = format!("oskit-{krate}");
        if !root.join("crates").join(krate).join("benches").exists() {
            fresh.push((package, "No benches.\n".to_string()));
            continue;
        }
        let out_dir = root.join("target").join("bench-report").join(krate);
        let _ = fs::remove_dir_all(&out_dir);
        let mut bench = cmd::cargo();
        bench
            .args(["bench", "-p", &package])
            .args(crate::budgets::extra_features(krate))
            .env("CRITERION_HOME", &out_dir);
        cmd::run(&mut bench)?;
        let body = format!(
            "Measured on {} (`cargo xtask bench {krate} --report`) on:\n\n{}\n{}",
            today(),
            machine(),
            table(&collect(&out_dir))
        );
        fresh.push((package, body));
    }
    let path = root.join("BENCHMARKS.md");
    let old = fs::read_to_string(&path).unwrap_or_default();
    let order: Vec<String> = CRATES.iter().map(|c| format!("oskit-{c}")).collect();
    let doc = splice(&old, &fresh, PREAMBLE, &order);
    fs::write(&path, doc).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_of_some_crates_replaces_only_their_sections() {
        let order: Vec<String> = ["oskit-a", "oskit-b", "oskit-c"].map(String::from).into();
        let old = "# Benchmarks\n\nold machine\n\n## oskit-a\n\nA notes\n| a | 1 |\n\n## oskit-c\n\nC table\n";
        let fresh = [("oskit-b".to_string(), "B table\n".to_string())];
        let doc = splice(old, &fresh, "HEAD\n", &order);
        assert_eq!(
            doc,
            "HEAD\n\n## oskit-a\n\nA notes\n| a | 1 |\n\n## oskit-b\n\nB table\n\n## oskit-c\n\nC table\n"
        );
        let fresh = [("oskit-a".to_string(), "new A\n".to_string())];
        let again = splice(&doc, &fresh, "HEAD\n", &order);
        assert!(
            again.contains("## oskit-a\n\nnew A\n\n## oskit-b"),
            "{again}"
        );
        assert!(!again.contains("A notes"), "{again}");
        assert!(again.contains("C table"), "{again}");
        // An empty or missing file: only the fresh sections.
        assert_eq!(
            splice("", &fresh, "H\n", &order),
            "H\n\n## oskit-a\n\nnew A\n"
        );
    }

    #[test]
    fn reads_criterion_json() {
        let bench = r#"{"group_id":"write","function_id":"oskit","value_str":"64","throughput":null,"full_id":"write/oskit/64"}"#;
        assert_eq!(json_str(bench, "group_id").as_deref(), Some("write"));
        assert_eq!(json_str(bench, "value_str").as_deref(), Some("64"));
        assert_eq!(json_str(bench, "missing"), None);
        let est = r#"{"mean":{"confidence_interval":{"confidence_level":0.95},"point_estimate":9.0},"median":{"confidence_interval":{"lower_bound":1.0},"point_estimate":12.5e1,"standard_error":0.1}}"#;
        assert_eq!(median(est), Some(125.0));
    }

    #[test]
    fn table_pairs_ours_with_each_peer_of_the_same_group_and_parameter() {
        let m = |group: &str, function: &str, value: &str, median_ns| Measurement {
            group: group.into(),
            function: function.into(),
            value: value.into(),
            median_ns,
        };
        let t = table(&[
            m("write", "oskit", "64", 10.0),
            m("write", "rtrb", "64", 5.0),
            m("write", "memcpy", "64", 2.0),
            m("write", "rtrb", "8", 1.0),
            m("read", "oskit", "", 7.0),
        ]);
        assert!(
            t.contains("| write | 64 | oskit | 10.0 ns | rtrb | 5.0 ns | 2.00× |"),
            "{t}"
        );
        assert!(
            t.contains("| write | 64 | oskit | 10.0 ns | memcpy | 2.0 ns | 5.00× |"),
            "{t}"
        );
        assert!(
            t.contains("| read |  | oskit | 7.0 ns | — | — | — |"),
            "{t}"
        );
        assert!(
            !t.contains("| 8 |"),
            "a peer without our entry is not a row: {t}"
        );
    }
}
