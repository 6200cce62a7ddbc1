//! The `outpost-simulations` CLI. See `simulations/README.md`.
//!
//! `run SCENARIO.toml [--seed N] [--nodes N] [--out DIR] [--set key=value]...` prints progress
//! to stderr and ends with one JSON line on stdout. Exit status: 0 when every checker passed,
//! 1 when one failed (the seed and the replay command are printed), 2 on bad input.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use outpost_simulations::{replay_command, report, run, RunOptions, Scenario};

#[derive(Parser)]
#[command(name = "outpost-simulations", about = "Seeded simulation of many outpost nodes in one process")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scenario.
    Run {
        /// The scenario file (TOML).
        scenario: PathBuf,
        /// Seed (default: the scenario's `seed`).
        #[arg(long)]
        seed: Option<u64>,
        /// Number of nodes (default: the scenario's `nodes`).
        #[arg(long)]
        nodes: Option<usize>,
        /// Write summary.json, SVG plots and report.md here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override a scenario field, e.g. `--set mobility.range_m=300` (TOML value syntax).
        #[arg(long = "set")]
        set: Vec<String>,
        /// No progress lines.
        #[arg(long, short)]
        quiet: bool,
    },
}

/// Log timestamps in virtual time since the start of the run.
struct VirtualTime;

impl tracing_subscriber::fmt::time::FormatTime for VirtualTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match outpost_simulations::node::virtual_ms() {
            Some(ms) => write!(w, "[{:>9.3}s]", ms as f64 / 1000.0),
            None => write!(w, "[        -]"),
        }
    }
}

fn main() -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .with_timer(VirtualTime)
            .try_init();
    }
    let Cmd::Run { scenario, seed, nodes, out, set, quiet } = Cli::parse().cmd;
    let scn = match Scenario::load(&scenario, &set) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let seed = seed.unwrap_or(scn.seed);
    let n = nodes.unwrap_or(scn.nodes);
    let replay = replay_command(&scenario.display().to_string(), seed, n, &set);
    let outcome = match run(scn, &RunOptions { seed: Some(seed), nodes: Some(n), progress: !quiet }) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = &out {
        if let Err(e) = report::write(dir, &outcome, &replay) {
            eprintln!("error: cannot write {}: {e}", dir.display());
            return ExitCode::from(2);
        }
        eprintln!("wrote {}", dir.display());
    }
    for f in &outcome.failures {
        eprintln!("FAILED {f}");
    }
    if !outcome.ok() {
        eprintln!("FAILED with seed {seed}; replay with:\n  {replay}");
    }
    println!("{}", serde_json::Value::Object(outcome.summary.clone()));
    if outcome.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
