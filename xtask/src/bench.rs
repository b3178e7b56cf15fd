//! `cargo xtask bench`: runs the benchmark binaries in release mode and collects their figures.
//!
//! Each benchmark binary prints a human-readable table and, per figure, a line
//! `BENCH {"name": …, "figure": …, "unit": …, "baseline": …, "ratio": …}` where the baseline was
//! measured in the same run. This task passes the table through and, with `--json`, prints all
//! figures as one JSON object on the last line of stdout: `{"scenarios": [...]}`.

use std::process::Stdio;

use crate::cargo;

/// A benchmark: the name users pass, and the cargo package and bench target that implement it.
struct Benchmark {
    name: &'static str,
    package: &'static str,
    target: &'static str,
}

const BENCHMARKS: &[Benchmark] = &[
    Benchmark { name: "hlc", package: "lsync-hlc", target: "hlc" },
    Benchmark { name: "transport", package: "lsync-transport", target: "transport" },
    Benchmark { name: "bulk", package: "lsync-state-sync", target: "bulk" },
    Benchmark { name: "sync", package: "lsync-node", target: "sync" },
];

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let mut quick = false;
    let mut json = false;
    let mut selected = Vec::new();
    for arg in args {
        match arg.as_str() {
            "--quick" => quick = true,
            "--json" => json = true,
            flag if flag.starts_with('-') => return Err(format!("unknown bench option {flag:?}")),
            name => match BENCHMARKS.iter().find(|bench| bench.name == name) {
                Some(bench) => selected.push(bench),
                None => {
                    let known: Vec<_> = BENCHMARKS.iter().map(|bench| bench.name).collect();
                    return Err(format!("unknown benchmark {name:?}; known: {}", known.join(", ")));
                }
            },
        }
    }
    if selected.is_empty() {
        selected = BENCHMARKS.iter().collect();
    }

    let mut scenarios = Vec::new();
    for bench in selected {
        let mut command = cargo();
        command
            .args(["bench", "--locked", "--package", bench.package, "--bench", bench.target])
            .stdout(Stdio::piped());
        if quick {
            command.env("LSYNC_BENCH_QUICK", "1");
        }
        eprintln!("xtask bench: {} ({})", bench.name, if quick { "quick" } else { "full" });
        let output = command
            .output()
            .map_err(|error| format!("cannot run the {} benchmark: {error}", bench.name))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        for line in stdout.lines() {
            match line.strip_prefix("BENCH ") {
                Some(figure) => scenarios.push(with_target(figure)),
                None if !json => println!("{line}"),
                None => eprintln!("{line}"),
            }
        }
        if !output.status.success() {
            return Err(format!("the {} benchmark failed ({})", bench.name, output.status));
        }
    }
    if json {
        println!("{{\"scenarios\":[{}]}}", scenarios.join(","));
    }
    Ok(())
}

/// Every scenario carries `target` and `met`; micro-benchmarks without a target get `null`.
fn with_target(figure: &str) -> String {
    if figure.contains("\"target\"") {
        return figure.to_owned();
    }
    match figure.strip_suffix('}') {
        Some(open) => format!("{open},\"target\":null,\"met\":null}}"),
        None => figure.to_owned(),
    }
}
