//! outpost-simulations: many outpost nodes — the same protocol code as production (`Core`, its
//! federation sender and receiver, the federation axum router) — in one process, on a
//! simulated network, in virtual time, reproducible from a seed.
//!
//! # Layout
//! - `scenario.rs` — the TOML scenario format.
//! - `net.rs` — the simulated network (latency, jitter, loss, bandwidth, links, partitions).
//! - `node.rs` — one node: `Core` over a `MemoryStore`, crash and restart; the virtual clock.
//! - `world.rs` — the driver: schedule, workload (joins, messages, state changes), faults,
//!   churn, mobility, the per-node observers and the convergence sampler.
//! - `checks.rs` — durability, delivery and convergence checkers; the figures.
//! - `report.rs` — `--out`: JSON, SVG plots, Markdown.
//! - `main.rs` — the CLI (`run SCENARIO.toml [--seed N] [--nodes N] [--out DIR]`).
//!
//! # Determinism
//! A run is one single-threaded tokio runtime with a paused clock that jumps to the next timer
//! whenever every task is idle; CPU work takes no virtual time. Every random choice (the
//! workload, the network, each node's ids and backoff jitter via `Core::open_with_rng`, node
//! keys) derives from the seed; the store flushes inline (`KvStore::flush_is_instant`), so no
//! blocking-pool thread can race the clock. Same scenario + seed → same events, same figures.

#![warn(missing_docs)]

pub mod checks;
pub mod net;
pub mod node;
pub mod report;
pub mod scenario;
pub mod world;

pub use checks::Outcome;
pub use scenario::Scenario;

/// How to run a scenario.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Seed (default: the scenario's).
    pub seed: Option<u64>,
    /// Node count (default: the scenario's).
    pub nodes: Option<usize>,
    /// Progress lines on stderr.
    pub progress: bool,
}

/// Run `scn` to the end and check it. `Err` only when the run could not be set up.
pub fn run(mut scn: Scenario, opts: &RunOptions) -> Result<Outcome, String> {
    if let Some(s) = opts.seed {
        scn.seed = s;
    }
    if let Some(n) = opts.nodes {
        if n == 0 {
            return Err("--nodes must be at least 1".into());
        }
        scn.nodes = n;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| format!("cannot build the runtime: {e}"))?;
    let wall = std::time::Instant::now();
    let progress = opts.progress;
    let mut outcome = rt.block_on(async move {
        let mut w = world::World::new(scn, progress);
        let r = w.run().await;
        let out = r.map(|()| checks::analyze(&mut w));
        w.shutdown();
        out
    })?;
    drop(rt);
    let wall_s = (wall.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
    outcome.summary.insert("wall_s".into(), serde_json::json!(wall_s));
    Ok(outcome)
}

/// The command that replays a run.
pub fn replay_command(path: &str, seed: u64, nodes: usize, overrides: &[String]) -> String {
    let mut c = format!("cargo run --release -p outpost-simulations -- run {path} --seed {seed} --nodes {nodes}");
    for o in overrides {
        c.push_str(&format!(" --set '{o}'"));
    }
    c
}
