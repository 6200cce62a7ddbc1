//! The `outpost` command-line tool.

use std::fmt::{Display, Write as _};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource::CommandLine;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use outpost::config::{Config, ENV_PREFIX};
use tracing_subscriber::EnvFilter;

const LONG_ABOUT: &str = "Runs a Matrix homeserver for this device. Matrix clients (Element, \
    FluffyChat, bots) connect to http://127.0.0.1:8008; data is kept in ./outpost-data by default.";
const SETTINGS: &str = "Settings, highest precedence first: command-line flags, environment \
    variables, the config file (TOML), built-in defaults. RUST_LOG, if set, overrides `log`.\n\n\
    Config file keys with their defaults, and the environment variable for each:\n\n";

/// The environment variables that clap reads for `run`'s flags.
const FLAG_ENV_VARS: [&str; 3] = ["OUTPOST_DATA_DIR", "OUTPOST_CLIENT_ADDR", "OUTPOST_CONFIG"];

/// A Matrix homeserver for this device, federating peer-to-peer.
#[derive(Parser)]
#[command(name = "outpost", version, long_about = LONG_ABOUT)]
#[command(after_long_help = "Run `outpost run --help` for every setting and its env variable.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Subcommands; add more as variants, each with its own `Args` struct.
#[derive(Subcommand)]
enum Command {
    /// Run the homeserver until Ctrl-C or SIGTERM.
    #[command(long_about = LONG_ABOUT)]
    Run(RunArgs),
}

/// Arguments of `outpost run`.
#[derive(Args)]
struct RunArgs {
    /// Directory for the database, signing key and media [default: ./outpost-data]
    #[arg(long, value_name = "DIR", env = "OUTPOST_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// IP address and port for Matrix clients, e.g. [::1]:8008 [default: 127.0.0.1:8008]
    #[arg(long, value_name = "IP:PORT", env = "OUTPOST_CLIENT_ADDR")]
    client_addr: Option<String>, // parsed in `run`, to report a bad value like other settings
    /// TOML config file with any of the settings below [default: none]
    #[arg(long, value_name = "FILE", env = "OUTPOST_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    // --help, --version and usage errors: clap's own output and exit codes.
    let matches = cli().try_get_matches().unwrap_or_else(|e| e.exit());
    let run_matches = matches.subcommand_matches("run");
    let addr_from_cli = run_matches.and_then(|m| m.value_source("client_addr")) == Some(CommandLine);
    match Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()).command {
        Command::Run(args) => run(args, addr_from_cli),
    }
}

/// `outpost run`: load the config, start logging, serve until shutdown.
fn run(args: RunArgs, addr_from_cli: bool) -> ExitCode {
    // clap has read the env vars of the flags (CLI > env); keep them out of `Config::load`.
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
        if key.starts_with(ENV_PREFIX) && !FLAG_ENV_VARS.contains(&key.as_str()) {
            let Ok(value) = value.into_string() else {
                return fail(2, format!("environment variable {key} is not UTF-8"));
            };
            env.push((key, value));
        }
    }
    let mut config = match Config::load(args.config.as_deref(), env) {
        Ok(config) => config,
        Err(e) => return fail(2, e),
    };
    config.data_dir = args.data_dir.unwrap_or(config.data_dir);
    if let Some(addr) = args.client_addr {
        let origin = if addr_from_cli { "--client-addr" } else { "environment variable OUTPOST_CLIENT_ADDR" };
        match addr.parse() {
            Ok(addr) => config.client_addr = addr,
            Err(e) => return fail(2, format!("invalid value in {origin}: {addr:?}: {e}")),
        }
    }
    if let Err(e) = init_logging(&config) {
        return fail(2, e);
    }
    tracing::debug!(?config, "configuration loaded");
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    let runtime = runtime.worker_threads(2).thread_name("outpost-worker").enable_all().build();
    match runtime.map(|rt| rt.block_on(outpost::server::run(config))) {
        Err(e) => fail(1, format!("cannot start the async runtime: {e}")),
        Ok(Err(e)) => fail(1, e),
        Ok(Ok(())) => ExitCode::SUCCESS,
    }
}

/// Logs to stderr, filtered by `RUST_LOG` if set and non-empty, else by `config.log`.
fn init_logging(config: &Config) -> Result<(), String> {
    let (source, directive) = match std::env::var_os("RUST_LOG").filter(|v| !v.is_empty()) {
        Some(v) => ("RUST_LOG", v.into_string().map_err(|_| "RUST_LOG is not UTF-8")?),
        None => ("log setting", config.log.clone()),
    };
    let filter = EnvFilter::try_new(&directive).map_err(|e| format!("invalid {source} {directive:?}: {e}"))?;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    let _ = subscriber.with_writer(std::io::stderr).try_init();
    Ok(())
}

/// Prints `outpost: error: <msg>` as one line to stderr and returns `code`.
fn fail(code: u8, msg: impl Display) -> ExitCode {
    let msg = msg.to_string();
    eprintln!("outpost: error: {}", msg.split_whitespace().collect::<Vec<_>>().join(" "));
    ExitCode::from(code)
}

/// The clap command, with `run --help` listing every setting from [`Config::default`].
fn cli() -> clap::Command {
    let (mut text, mut prefix) = (String::from(SETTINGS), String::new());
    for line in toml::to_string(&Config::default()).unwrap_or_default().lines() {
        if let Some(table) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            prefix = format!("{}_", table.to_ascii_uppercase());
        }
        let var = line.split_once(" = ").map(|(key, _)| key.to_ascii_uppercase());
        let var = var.map(|key| format!("# {ENV_PREFIX}{prefix}{key}")).unwrap_or_default();
        let _ = writeln!(text, "{}", format!("  {line:<40} {var}").trim_end());
    }
    Cli::command().mut_subcommand("run", |c| c.after_long_help(text))
}

#[cfg(test)]
mod tests {
    #[test]
    fn help_is_well_formed_and_lists_every_setting() {
        let mut cmd = super::cli();
        cmd.build();
        cmd.clone().debug_assert();
        let help = cmd.find_subcommand_mut("run").expect("run").render_long_help().to_string();
        let (addr, var) = ("client_addr = \"127.0.0.1:8008\"", "# OUTPOST_LIMITS_SLED_CACHE_BYTES");
        for needle in ["[env: OUTPOST_DATA_DIR=]", "[env: OUTPOST_CONFIG=]", addr, var, "[limits]"] {
            assert!(help.contains(needle), "missing {needle} in:\n{help}");
        }
    }
}
