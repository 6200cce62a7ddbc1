//! Node configuration: built-in defaults, overlaid by an optional TOML file, overlaid by
//! environment variables (`OUTPOST_<FIELD>`, or `OUTPOST_LIMITS_<FIELD>` for `[limits]`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Prefix of every environment variable that sets a configuration field.
pub const ENV_PREFIX: &str = "OUTPOST_";

/// Configuration of one node. Every field has a default, so an empty file is a valid config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory holding the database, the node's signing key and media. Default `./outpost-data`.
    pub data_dir: PathBuf,
    /// Address the client-server API listens on. Default `127.0.0.1:8008` (this device only).
    pub client_addr: SocketAddr,
    /// Log filter, a `tracing_subscriber::EnvFilter` directive such as `info,outpost=debug`;
    /// `RUST_LOG` overrides it. Default `info,ruma_state_res=warn` (ruma logs every auth check at info).
    pub log: String,
    /// Whether new accounts may be created with `/register`. Default `true`.
    pub registration_enabled: bool,
    /// Resource limits, the `[limits]` table.
    pub limits: Limits,
    /// The peer-to-peer mesh, the `[mesh]` table.
    pub mesh: MeshSettings,
}

/// The libp2p mesh: where to listen, whom to dial, where to look with mDNS.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshSettings {
    /// Federate over the mesh at all. Default `true`.
    pub enabled: bool,
    /// libp2p listen multiaddrs. Default QUIC and TCP on port 8448 on every interface.
    pub listen: Vec<String>,
    /// Static peers (multiaddrs, optionally ending in `/p2p/<peer id>`). Default none.
    pub peers: Vec<String>,
    /// Advertise and browse with mDNS. Default `true`.
    pub mdns: bool,
    /// Interfaces mDNS runs on; empty means every non-loopback interface. Default empty.
    pub mdns_interfaces: Vec<String>,
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings {
            enabled: true,
            listen: vec!["/ip4/0.0.0.0/udp/8448/quic-v1".to_owned(), "/ip4/0.0.0.0/tcp/8448".to_owned()],
            peers: Vec::new(),
            mdns: true,
            mdns_interfaces: Vec::new(),
        }
    }
}

/// Resource limits. Outpost runs on phones and small boards, so everything that grows is bounded.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted JSON request body. Default 1 MiB (1_048_576).
    pub max_request_bytes: usize,
    /// Largest PDU, as canonical JSON (the spec's limit). Default 65_536.
    pub max_event_bytes: usize,
    /// Longest `/sync` long-poll a client may ask for; longer `timeout`s are clamped.
    /// Default 30_000.
    pub sync_timeout_ms_max: u64,
    /// Most events per room in one `/sync` timeline or `/messages` page. Default 100.
    pub timeline_limit_max: usize,
    /// Events per room timeline when the client's filter sets no limit. Default 20.
    pub timeline_limit_default: usize,
    /// Size of sled's page cache. Default 8 MiB (8_388_608).
    pub sled_cache_bytes: u64,
    /// Most bytes of applied, not yet flushed batches held in the store's write buffer before
    /// they go to sled (docs/storage.md). Default 4 MiB (4_194_304).
    pub store_write_buffer_bytes: usize,
    /// Client requests handled at once; further ones wait. Default 256.
    pub max_concurrent_requests: usize,
    /// Transaction ids remembered per device for idempotent `/send`; the oldest are forgotten.
    /// Default 1000.
    pub txn_ids_per_device_max: usize,
    /// Largest media upload (`m.upload.size`); larger ones get 413 `M_TOO_LARGE`. Separate from
    /// `max_request_bytes`: media bodies are streamed to disk. Default 50 MiB (52_428_800).
    pub max_upload_bytes: u64,
    /// Largest image (width × height) that is decoded to make a thumbnail; larger ones get
    /// 413 `M_TOO_LARGE` from the thumbnail endpoints. Default 25_000_000.
    pub thumbnail_source_pixels_max: u64,
    /// `mxc://` URIs a user may hold reserved (`/media/v1/create`) but not yet uploaded; more
    /// get 429 `M_LIMIT_EXCEEDED`. Default 10.
    pub pending_uploads_per_user_max: usize,
    /// Longest typing notification a client may set; longer `timeout`s are clamped.
    /// Default 120_000.
    pub typing_timeout_ms_max: u64,
    /// Events looked at per room when counting unread notifications after a read receipt; the
    /// counts stop there. Default 1000.
    pub unread_scan_events_max: usize,
    /// Stored events kept decoded in memory (auth events are read many times per received
    /// event). 0 disables the cache. Default 1024 (a few MiB at most).
    pub pdu_cache_entries: usize,
    /// Events looked at per `/search` request (newest first, across the user's rooms).
    /// Default 10_000.
    pub search_scan_events_max: usize,
    /// Relations looked at per event for bundled aggregations, per `/relations` page and per
    /// `/threads` page. Default 1000.
    pub relations_scan_max: usize,
    /// Pushers a user may register. Default 32.
    pub pushers_per_user_max: usize,
    /// Most results of one `/user_directory/search`. Default 50.
    pub user_directory_limit_max: usize,
    /// To-device messages waiting per device. When a device's inbox is full, the oldest waiting
    /// message is dropped (and a warning logged) to make room for the new one: a device away that
    /// long recovers missing room keys from key backup or by asking its other devices.
    /// Default 1000.
    pub to_device_inbox_max: usize,
    /// To-device messages delivered in one `/sync` response; the rest follow in the next ones.
    /// Default 100.
    pub to_device_per_sync_max: usize,
    /// One-time keys stored per device; an upload that would exceed it is refused with 400
    /// `M_INVALID_PARAM` (clients keep about 50). Default 200.
    pub one_time_keys_per_device_max: usize,
    /// Typing and receipt notifications (EDUs) waiting in memory per destination server. When
    /// full, the oldest typing notification is dropped (else the oldest receipt). Default 500.
    pub edu_ephemeral_per_destination_max: usize,
    /// Device-list, signing-key and to-device EDUs waiting in the store per destination server.
    /// When full, the oldest is dropped with a warning (a dropped device-list update makes the
    /// peer re-fetch the list; a dropped to-device message is lost). Default 10_000.
    pub edu_durable_per_destination_max: usize,
    /// Longest wait for other servers when a client asks for their users' keys, profiles or
    /// room directory (ms); servers that do not answer in time are reported as failures.
    /// Default 10_000.
    pub federation_query_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./outpost-data"),
            client_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 8008)),
            log: "info,ruma_state_res=warn".to_owned(),
            registration_enabled: true,
            limits: Limits::default(),
            mesh: MeshSettings::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 1_048_576,
            max_event_bytes: 65_536,
            sync_timeout_ms_max: 30_000,
            timeline_limit_max: 100,
            timeline_limit_default: 20,
            sled_cache_bytes: 8 * 1024 * 1024,
            store_write_buffer_bytes: 4 * 1024 * 1024,
            max_concurrent_requests: 256,
            txn_ids_per_device_max: 1000,
            max_upload_bytes: 50 * 1024 * 1024,
            thumbnail_source_pixels_max: 25_000_000,
            pending_uploads_per_user_max: 10,
            typing_timeout_ms_max: 120_000,
            unread_scan_events_max: 1000,
            pdu_cache_entries: 1024,
            search_scan_events_max: 10_000,
            relations_scan_max: 1000,
            pushers_per_user_max: 32,
            user_directory_limit_max: 50,
            to_device_inbox_max: 1000,
            to_device_per_sync_max: 100,
            one_time_keys_per_device_max: 200,
            edu_ephemeral_per_destination_max: 500,
            edu_durable_per_destination_max: 10_000,
            federation_query_timeout_ms: 10_000,
        }
    }
}

/// Why a configuration could not be loaded. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The config file is not valid TOML, or has an unknown key or a value of the wrong type.
    #[error("invalid config file {}: {reason}", path.display())]
    File {
        /// The config file.
        path: PathBuf,
        /// What is wrong, with line and column.
        reason: String,
    },
    /// An `OUTPOST_*` environment variable holds a value of the wrong type.
    #[error("invalid value in environment variable {var}: {reason}")]
    Env {
        /// The variable's name.
        var: String,
        /// What is wrong.
        reason: String,
    },
    /// The settings are individually valid but inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads the configuration: defaults, then `file` (if any), then the `OUTPOST_*` variables in
    /// `env` (the process's environment, or a test list). Other and unknown variables are ignored,
    /// including `OUTPOST_CONFIG`, which the CLI uses for the file path. A variable for a string
    /// field is taken verbatim; any other is parsed as a TOML value (`42`, `true`).
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let base = match file {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                toml::from_str(&text)
                    .map_err(|e| ConfigError::File { path: path.to_owned(), reason: one_line(&e, &text) })?
            }
        };
        let mut table = toml::Table::try_from(&base).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut config = base;
        for (var, raw) in env {
            let Some(slot) = env_slot(&mut table, &var) else { continue };
            *slot = match slot.is_str() {
                true => toml::Value::String(raw),
                false => {
                    toml::Value::deserialize(toml::de::ValueDeserializer::new(&raw)).unwrap_or(toml::Value::String(raw))
                }
            };
            config = toml::Value::Table(table.clone())
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Env { var, reason: flatten(e.message()) })?;
        }
        let l = &config.limits;
        if l.timeline_limit_default == 0 || l.timeline_limit_default > l.timeline_limit_max {
            return Err(ConfigError::Invalid(format!(
                "limits.timeline_limit_default ({}) must be 1 to timeline_limit_max ({})",
                l.timeline_limit_default, l.timeline_limit_max
            )));
        }
        if l.to_device_inbox_max == 0 || l.to_device_per_sync_max == 0 {
            return Err(ConfigError::Invalid(
                "limits.to_device_inbox_max and to_device_per_sync_max must be > 0".into(),
            ));
        }
        if l.max_concurrent_requests == 0 {
            return Err(ConfigError::Invalid("limits.max_concurrent_requests must be > 0".into()));
        }
        Ok(config)
    }
}

/// The value that `OUTPOST_FOO` (`foo`) or `OUTPOST_LIMITS_FOO` (`limits.foo`) sets, if a field.
fn env_slot<'t>(table: &'t mut toml::Table, var: &str) -> Option<&'t mut toml::Value> {
    let rest = var.strip_prefix(ENV_PREFIX).filter(|r| !r.bytes().any(|b| b.is_ascii_lowercase()));
    let rest = rest?.to_ascii_lowercase();
    let (table, key) = match rest.strip_prefix("limits_") {
        Some(key) => (table.get_mut("limits")?.as_table_mut()?, key),
        None => (&mut *table, rest.as_str()),
    };
    table.get_mut(key).filter(|v| !v.is_table())
}

/// A TOML error as one line, with its position in `text` when known.
fn one_line(e: &toml::de::Error, text: &str) -> String {
    let msg = flatten(e.message());
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {msg}")
        }
        None => msg,
    }
}

/// Joins a possibly multi-line message into one line.
fn flatten(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), text).expect("write temp file");
        f
    }

    #[test]
    fn defaults() {
        let c = Config::load(None, env(&[("HOME", "/root"), ("OUTPOST_CONFIG", "x.toml")])).expect("load");
        assert_eq!(c, Config::default());
        assert_eq!(c.data_dir, PathBuf::from("./outpost-data"));
        assert_eq!(c.client_addr.to_string(), "127.0.0.1:8008");
        assert_eq!((c.log.as_str(), c.registration_enabled), ("info,ruma_state_res=warn", true));
        assert_eq!(c.limits.max_request_bytes, 1_048_576);
        assert_eq!(c.limits.sled_cache_bytes, 8_388_608);
        assert_eq!(c.limits.max_upload_bytes, 52_428_800);
        assert_eq!(toml::from_str::<Config>("").expect("empty file"), c);
    }

    #[test]
    fn file_overlay() {
        let f = file("data_dir = \"/var/lib/outpost\"\n[limits]\nmax_event_bytes = 1000\n");
        let c = Config::load(Some(f.path()), env(&[])).expect("load");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/outpost"));
        assert_eq!(c.limits.max_event_bytes, 1000);
        assert_eq!(c.limits.max_request_bytes, 1_048_576);
        assert_eq!(c.client_addr, Config::default().client_addr);
    }

    #[test]
    fn env_overlay_beats_file() {
        let f = file("client_addr = \"0.0.0.0:9000\"\nlog = \"debug\"\n[limits]\nsync_timeout_ms_max = 5\n");
        let vars = env(&[
            ("OUTPOST_CLIENT_ADDR", "[::1]:8448"),
            ("OUTPOST_DATA_DIR", "/tmp/x y"),
            ("OUTPOST_LOG", "true"),
            ("OUTPOST_REGISTRATION_ENABLED", "false"),
            ("OUTPOST_LIMITS_SYNC_TIMEOUT_MS_MAX", "60000"),
            ("OUTPOST_LIMITS", "7"),
            ("OUTPOST_NO_SUCH_THING", "7"),
            ("OUTPOST_limits_max_event_bytes", "7"),
        ]);
        let c = Config::load(Some(f.path()), vars).expect("load");
        assert_eq!(c.client_addr.to_string(), "[::1]:8448");
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x y"));
        assert_eq!(c.log, "true");
        assert!(!c.registration_enabled);
        assert_eq!(c.limits.sync_timeout_ms_max, 60_000);
        assert_eq!(c.limits.max_event_bytes, 65_536);
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        for (var, value) in [
            ("OUTPOST_LIMITS_MAX_REQUEST_BYTES", "lots"),
            ("OUTPOST_LIMITS_MAX_REQUEST_BYTES", "-1"),
            ("OUTPOST_CLIENT_ADDR", "localhost"),
            ("OUTPOST_REGISTRATION_ENABLED", "yes"),
        ] {
            let err = Config::load(None, env(&[(var, value)])).expect_err(value);
            assert!(matches!(&err, ConfigError::Env { var: v, .. } if v == var), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains(var) && !msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn file_errors_name_the_path_on_one_line() {
        let f = file("log = \"info\"\n[limits]\nmax_event_byte = 10\n");
        let err = Config::load(Some(f.path()), env(&[])).expect_err("unknown key");
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::File { .. }), "{msg}");
        assert!(msg.contains(&f.path().display().to_string()) && msg.contains("line 3"), "{msg}");
        assert!(msg.contains("max_event_byte") && !msg.contains('\n'), "{msg}");

        let f = file("data_dir = \n");
        let msg = Config::load(Some(f.path()), env(&[])).expect_err("bad toml").to_string();
        assert!(msg.starts_with("invalid config file") && !msg.contains('\n'), "{msg}");

        let missing = Path::new("/nonexistent/outpost.toml");
        let msg = Config::load(Some(missing), env(&[])).expect_err("missing").to_string();
        assert!(msg.starts_with("cannot read config file /nonexistent/outpost.toml: "), "{msg}");
    }

    #[test]
    fn inconsistent_limits_are_rejected() {
        let vars = env(&[("OUTPOST_LIMITS_TIMELINE_LIMIT_DEFAULT", "500")]);
        let err = Config::load(None, vars).expect_err("default above max");
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
    }
}
