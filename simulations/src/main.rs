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

fn main() -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
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
