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
    /// Print a running node's status (server name, peer id, uptime, counts) as JSON.
    Status(QueryArgs),
    /// Print a running node's mesh peers (address, connection state, round trip, queue depth).
    Peers(QueryArgs),
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
    /// libp2p listen address, repeatable [default: /ip4/0.0.0.0/udp/8448/quic-v1 and /ip4/0.0.0.0/tcp/8448]
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// Static peer to dial, repeatable, e.g. /ip4/10.0.0.2/udp/8448/quic-v1/p2p/12D3Koo...
    #[arg(long, value_name = "MULTIADDR")]
    peer: Vec<String>,
    /// Interface for mDNS discovery, repeatable [default: every non-loopback interface]
    #[arg(long, value_name = "NAME")]
    mdns_interface: Vec<String>,
    /// Do not advertise or browse with mDNS (static peers only)
    #[arg(long)]
    no_mdns: bool,
}

/// Arguments of `outpost status` and `outpost peers`.
#[derive(Args)]
struct QueryArgs {
    /// The node's data directory (its operator token is read from there) [default: ./outpost-data]
    #[arg(long, value_name = "DIR", env = "OUTPOST_DATA_DIR", default_value = "./outpost-data")]
    data_dir: PathBuf,
    /// The node's client address [default: 127.0.0.1:8008]
    #[arg(long, value_name = "IP:PORT", env = "OUTPOST_CLIENT_ADDR", default_value = "127.0.0.1:8008")]
    client_addr: String,
}

/// glibc gives every thread that allocates its own malloc arena and keeps what is freed there:
/// after 100,000 events from 16 concurrent senders the node's RSS was 215–252 MiB, of which
/// ~190 MiB freed memory held in arenas (61 MiB with two arenas, same run). A device has little
/// memory, so the node uses two unless `MALLOC_ARENA_MAX` says otherwise. Must run before any
/// other thread exists.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator parameters; called before other threads start.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn main() -> ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    limit_malloc_arenas();
    // --help, --version and usage errors: clap's own output and exit codes.
    let matches = cli().try_get_matches().unwrap_or_else(|e| e.exit());
    let run_matches = matches.subcommand_matches("run");
    let addr_from_cli = run_matches.and_then(|m| m.value_source("client_addr")) == Some(CommandLine);
    match Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()).command {
        Command::Run(args) => run(args, addr_from_cli),
        Command::Status(q) => query(q, "/_outpost/v1/status"),
        Command::Peers(q) => query(q, "/_outpost/v1/peers"),
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
    if !args.listen.is_empty() {
        config.mesh.listen = args.listen;
    }
    config.mesh.peers.extend(args.peer);
    if !args.mdns_interface.is_empty() {
        config.mesh.mdns_interfaces = args.mdns_interface;
    }
    if args.no_mdns {
        config.mesh.mdns = false;
    }
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

/// `outpost status` / `outpost peers`: ask the running node over its client address, with
/// the operator token it keeps in its data directory.
fn query(q: QueryArgs, path: &str) -> ExitCode {
    use std::io::{Read, Write};
    let token_path = q.data_dir.join(outpost::server::OPERATOR_TOKEN_FILE);
    let token = match std::fs::read_to_string(&token_path) {
        Ok(t) => t.trim().to_owned(),
        Err(e) => {
            return fail(
                1,
                format!("cannot read {}: {e} (is a node running with this data dir?)", token_path.display()),
            )
        }
    };
    let mut stream = match std::net::TcpStream::connect(&q.client_addr) {
        Ok(s) => s,
        Err(e) => return fail(1, format!("cannot reach the node at {}: {e}", q.client_addr)),
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n",
        q.client_addr
    );
    let mut resp = String::new();
    if let Err(e) = stream.write_all(req.as_bytes()).and_then(|_| stream.read_to_string(&mut resp)) {
        return fail(1, format!("request failed: {e}"));
    }
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return fail(1, format!("the node answered: {} {}", head.lines().next().unwrap_or(""), body.trim()));
    }
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or(body)),
        Err(_) => println!("{body}"),
    }
    ExitCode::SUCCESS
}

/// Decode an HTTP/1.1 chunked body.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Logs to stderr, filtered by `RUST_LOG` if set and non-empty, else by `config.log`.
fn init_logging(config: &Config) -> Result<(), String> {
    let (source, directive) = match std::env::var_os("RUST_LOG").filter(|v| !v.is_empty()) {
        Some(v) => ("RUST_LOG", v.into_string().map_err(|_| "RUST_LOG is not UTF-8")?),
        None => ("log setting", config.log.clone()),
    };
    // ruma's auth rules log every check at INFO (several lines per event on every node): keep
    // them at WARN unless the directive names them.
    let directive =
        if directive.contains("ruma_state_res") { directive } else { format!("{directive},ruma_state_res=warn") };
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
