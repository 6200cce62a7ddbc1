//! Helpers shared by the simulation tests.

use std::path::PathBuf;

use outpost_simulations::{replay_command, run, Outcome, RunOptions, Scenario};

/// Run `scenarios/<file>` with `seed`, `nodes` and `overrides` (small N, debug build).
pub fn sim(file: &str, seed: u64, nodes: usize, overrides: &[&str]) -> Outcome {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios").join(file);
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let scn = Scenario::load(&path, &overrides).expect("scenario parses");
    run(scn, &RunOptions { seed: Some(seed), nodes: Some(nodes), progress: false }).expect("the run starts")
}

/// Run and require every checker to pass; on failure, print the replay command.
pub fn sim_ok(file: &str, seed: u64, nodes: usize, overrides: &[&str]) -> Outcome {
    let o = sim(file, seed, nodes, overrides);
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    assert!(
        o.ok(),
        "{file} failed with seed {seed}: {:#?}\nreplay: {}\nsummary: {}",
        o.failures,
        replay_command(&format!("simulations/scenarios/{file}"), seed, nodes, &ov),
        serde_json::Value::Object(o.summary.clone())
    );
    o
}
