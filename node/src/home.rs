//! A node's home directory: its key files, its config, and (later) its database.
//!
//! ```text
//! HOME/                 mode 0700
//!   config.toml         commented settings (device name, role)
//!   keys/               mode 0700
//!     ed25519.key       signing seed: the device's identity (mode 0600)
//!     x25519.key        key-wrapping seed: receives mesh keys (mode 0600)
//! ```
//!
//! Key files are written atomically (temp file, fsync, rename) with mode 0600 and refused on
//! load if the group or others can read them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use meshsync_crdt::{DeviceId, DeviceKeys, Role};
use serde::Deserialize;
use zeroize::Zeroizing;

const SIGNING_KEY_FILE: &str = "keys/ed25519.key";
const KEM_KEY_FILE: &str = "keys/x25519.key";
const CONFIG_FILE: &str = "config.toml";

/// Why a home could not be used. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("no meshsync device in {0}: run `meshsync init` first, or pass --home DIR / set MESHSYNC_HOME")]
    NotInitialised(PathBuf),
    #[error("{path} already holds device {device}; nothing was changed. Use another --home to make a second device")]
    AlreadyInitialised { path: PathBuf, device: DeviceId },
    #[error("key file {path} can be read by other users (mode {mode:03o}); run `chmod 600 {path}` and try again")]
    LooseKeyPermissions { path: PathBuf, mode: u32 },
    #[error("key file {path} is damaged ({reason}); restore it from a backup, or make a new device with `meshsync init` in an empty home")]
    BadKeyFile { path: PathBuf, reason: String },
    #[error("config file {path} is invalid: {reason}; fix it (its comments say what each setting takes) and try again")]
    BadConfig { path: PathBuf, reason: String },
    #[error("{path}: {source}{}", io_hint(source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no home directory could be found for this user; pass --home DIR or set MESHSYNC_HOME"
    )]
    NoDefaultHome,
    #[error(transparent)]
    PeerAddr(#[from] PeerAddrError),
}

/// What to do about an I/O error on a home's file.
fn io_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::PermissionDenied => {
            "; run meshsync as the user who owns this home, or pass --home DIR"
        }
        std::io::ErrorKind::NotFound => {
            "; the home is incomplete: restore it from a backup, or make a new one with `meshsync init`"
        }
        _ => "",
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HomeError + '_ {
    move |source| HomeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Settings from `config.toml`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub name: String,
    #[serde(default = "default_role")]
    pub role: String,
    /// Static peer addresses (multiaddrs) to dial besides those found by mDNS.
    #[serde(default)]
    pub peers: Vec<String>,
    /// How long overwritten and deleted files stay restorable, e.g. "30d".
    #[serde(default)]
    pub retention: Option<String>,
    /// The local web page's port on 127.0.0.1 (0: any free port; `meshsync web` prints the
    /// address). The page is never served on another interface.
    #[serde(default = "default_web_port")]
    pub web_port: u16,
}

/// The web page's default port (Syncthing's is 8384).
pub const DEFAULT_WEB_PORT: u16 = 8385;

fn default_web_port() -> u16 {
    DEFAULT_WEB_PORT
}

fn default_role() -> String {
    "device".into()
}

impl Config {
    pub fn role(&self) -> Result<Role, String> {
        self.role.parse()
    }

    /// The retention of old versions, in seconds (default 30 days).
    pub fn retention_secs(&self) -> Result<u64, HomeError> {
        match &self.retention {
            None => Ok(crate::versions::DEFAULT_RETENTION_SECS),
            Some(text) => parse_duration(text).map_err(|reason| HomeError::BadConfig {
                path: PathBuf::from(CONFIG_FILE),
                reason: format!("retention: {reason}"),
            }),
        }
    }
}

/// Parses durations like `600s`, `10m`, `1h`, `30d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let bad = || format!("{text:?} is not a duration like 600s, 10m, 1h or 30d");
    let n: u64 = number.parse().map_err(|_| bad())?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).ok_or_else(bad)
}

/// A node's home directory.
#[derive(Debug, Clone)]
pub struct Home {
    path: PathBuf,
}

impl Home {
    /// The home at `path`, or else the platform's data directory for meshsync.
    pub fn locate(path: Option<PathBuf>) -> Result<Home, HomeError> {
        let path = match path {
            Some(path) => path,
            None => directories::ProjectDirs::from("", "", "meshsync")
                .ok_or(HomeError::NoDefaultHome)?
                .data_dir()
                .to_path_buf(),
        };
        Ok(Home { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes sure only the owner can enter the home (keys, state, the control socket live
    /// here): a home others could read or enter is changed to mode 0700. Returns the mode it
    /// had when it had to be fixed, for the caller to say so.
    pub fn make_private(&self) -> Result<Option<u32>, HomeError> {
        let mode = fs::metadata(&self.path)
            .map_err(io(&self.path))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 == 0 {
            return Ok(None);
        }
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700))
            .map_err(io(&self.path))?;
        Ok(Some(mode))
    }

    /// What a daemon does first: load the keys, check the config (a bad `config.toml` stops
    /// the start with its reason) and make the home private (saying so if it was not).
    pub fn open_for_daemon(&self) -> Result<DeviceKeys, HomeError> {
        let keys = self.load_keys()?;
        self.config()?;
        if let Some(mode) = self.make_private()? {
            tracing::warn!(
                home = %self.path.display(),
                "the home could be entered by other users (mode {mode:03o}); it is now 0700"
            );
        }
        Ok(keys)
    }

    pub fn is_initialised(&self) -> bool {
        self.path.join(SIGNING_KEY_FILE).exists()
    }

    /// Creates a new device here: key pairs and config. Refuses if a device is already here.
    pub fn init(&self, name: &str, role: Role) -> Result<DeviceKeys, HomeError> {
        if self.is_initialised() {
            let device = self.load_keys()?.device_id();
            return Err(HomeError::AlreadyInitialised {
                path: self.path.clone(),
                device,
            });
        }
        create_private_dir(&self.path)?;
        self.make_private()?;
        create_private_dir(&self.path.join("keys"))?;
        let keys = DeviceKeys::generate();
        write_private(
            &self.path.join(KEM_KEY_FILE),
            &key_file_text("X25519 key-wrapping seed", &keys.kem_seed()),
        )?;
        let config = format!(
            "# meshsync device settings. Edit while the daemon is stopped.\n\
             \n\
             # The name other devices show for this one.\n\
             name = {name:?}\n\
             \n\
             # device: a full member that reads and writes folders.\n\
             # storage: holds only ciphertext for the mesh (set by `meshsync init --storage`).\n\
             role = \"{role}\"\n\
             \n\
             # How long overwritten and deleted files stay restorable (`meshsync versions`).\n\
             # retention = \"30d\"\n\
             \n\
             # Addresses of other devices to dial, besides those found on the LAN by mDNS.\n\
             # Managed with `meshsync peer add|list|remove`, e.g. \"/ip4/192.168.1.20/tcp/22000\".\n\
             peers = []\n\
             \n\
             # The local web page, on 127.0.0.1 only (`meshsync web` prints its link; 0 = any\n\
             # free port; `meshsync up --no-web` turns it off).\n\
             # web_port = {DEFAULT_WEB_PORT}\n"
        );
        write_private(&self.path.join(CONFIG_FILE), &Zeroizing::new(config))?;
        // The signing key goes last: its presence is what marks the home as initialised.
        write_private(
            &self.path.join(SIGNING_KEY_FILE),
            &key_file_text(
                "Ed25519 signing seed (the device identity)",
                &keys.signing_seed(),
            ),
        )?;
        Ok(keys)
    }

    /// Loads the device's keys, refusing key files that others can read.
    pub fn load_keys(&self) -> Result<DeviceKeys, HomeError> {
        if !self.is_initialised() {
            return Err(HomeError::NotInitialised(self.path.clone()));
        }
        let signing = read_key_file(&self.path.join(SIGNING_KEY_FILE))?;
        let kem = read_key_file(&self.path.join(KEM_KEY_FILE))?;
        Ok(DeviceKeys::from_seeds(signing, kem))
    }

    pub fn config(&self) -> Result<Config, HomeError> {
        let path = self.path.join(CONFIG_FILE);
        let text = fs::read_to_string(&path).map_err(io(&path))?;
        let config: Config = toml::from_str(&text).map_err(|e| HomeError::BadConfig {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        config
            .role()
            .map_err(|reason| HomeError::BadConfig { path, reason })?;
        Ok(config)
    }
}

/// Why a static peer address was refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerAddrError {
    #[error("{0:?} is not a multiaddr; write it like /ip4/192.168.1.20/tcp/22000 or /ip4/192.168.1.20/udp/22000/quic-v1")]
    Syntax(String),
    #[error(
        "{0:?} must name an IP address (or DNS name) and a TCP port or a QUIC (udp/…/quic-v1) port, e.g. /ip4/192.168.1.20/tcp/22000"
    )]
    Incomplete(String),
    #[error("{0:?} is not in the peer list (see `meshsync peer list`)")]
    NotListed(String),
    #[error("{0:?} is already in the peer list; nothing changed (see `meshsync peer list`)")]
    Duplicate(String),
}

/// Parses and checks a static peer address: an IP (or DNS name) plus TCP or QUIC.
pub fn parse_peer_addr(text: &str) -> Result<String, PeerAddrError> {
    use meshsync_transport::Multiaddr;
    let addr: Multiaddr = text
        .trim()
        .parse()
        .map_err(|_| PeerAddrError::Syntax(text.to_string()))?;
    let parts: Vec<String> = addr.iter().map(|p| p.tag().to_string()).collect();
    let host = matches!(
        parts.first().map(String::as_str),
        Some("ip4" | "ip6" | "dns" | "dns4" | "dns6")
    );
    let tcp = parts.len() >= 2 && parts[1] == "tcp";
    let quic = parts.len() >= 3 && parts[1] == "udp" && parts[2] == "quic-v1";
    let extra_ok = parts
        .iter()
        .skip(if quic { 3 } else { 2 })
        .all(|p| p == "p2p");
    if !(host && (tcp || quic) && extra_ok) {
        return Err(PeerAddrError::Incomplete(text.to_string()));
    }
    Ok(addr.to_string())
}

impl Home {
    /// Adds a static peer address to `config.toml`, keeping its comments.
    pub fn add_peer(&self, text: &str) -> Result<String, HomeError> {
        let addr = parse_peer_addr(text)?;
        self.edit_peers(|peers| {
            if peers.contains(&addr) {
                return Err(PeerAddrError::Duplicate(addr.clone()));
            }
            peers.push(addr.clone());
            Ok(())
        })?;
        Ok(addr)
    }

    /// Removes a static peer address from `config.toml`.
    pub fn remove_peer(&self, text: &str) -> Result<String, HomeError> {
        let addr = parse_peer_addr(text).unwrap_or_else(|_| text.trim().to_string());
        self.edit_peers(|peers| {
            let before = peers.len();
            peers.retain(|p| *p != addr);
            if peers.len() == before {
                return Err(PeerAddrError::NotListed(addr.clone()));
            }
            Ok(())
        })?;
        Ok(addr)
    }

    fn edit_peers(
        &self,
        change: impl FnOnce(&mut Vec<String>) -> Result<(), PeerAddrError>,
    ) -> Result<(), HomeError> {
        if !self.is_initialised() {
            return Err(HomeError::NotInitialised(self.path.clone()));
        }
        let path = self.path.join(CONFIG_FILE);
        let text = fs::read_to_string(&path).map_err(io(&path))?;
        let mut doc: toml_edit::DocumentMut =
            text.parse()
                .map_err(|e: toml_edit::TomlError| HomeError::BadConfig {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
        let mut peers: Vec<String> = self.config()?.peers;
        change(&mut peers)?;
        let mut array = toml_edit::Array::new();
        for peer in &peers {
            array.push(peer.as_str());
        }
        doc["peers"] = toml_edit::value(array);
        write_private(&path, &doc.to_string())
    }
}

fn create_private_dir(path: &Path) -> Result<(), HomeError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io(path))
}

fn key_file_text(what: &str, seed: &[u8; 32]) -> Zeroizing<String> {
    Zeroizing::new(format!(
        "# meshsync {what}. Secret: never share or sync this file.\n{}\n",
        data_encoding::HEXLOWER.encode(seed)
    ))
}

/// Writes `text` to `path` with mode 0600: temp file, fsync, rename, fsync of the directory.
fn write_private(path: &Path, text: &str) -> Result<(), HomeError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".meshsync-tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(text.as_bytes()).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

fn read_key_file(path: &Path) -> Result<Zeroizing<[u8; 32]>, HomeError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(HomeError::LooseKeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let bad = |reason: &str| HomeError::BadKeyFile {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let text = Zeroizing::new(fs::read_to_string(path).map_err(io(path))?);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| bad("no key in it"))?;
    let bytes = Zeroizing::new(
        data_encoding::HEXLOWER_PERMISSIVE
            .decode(line.as_bytes())
            .map_err(|_| bad("the key is not hexadecimal"))?,
    );
    let seed: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| bad("the key is not 32 bytes"))?;
    Ok(Zeroizing::new(seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_home_others_can_enter_is_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("home");
        fs::create_dir(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        let home = Home::locate(Some(path.clone())).unwrap();
        home.init("laptop", Role::Device).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o750)).unwrap();
        assert_eq!(home.make_private().unwrap(), Some(0o750));
        assert_eq!(home.make_private().unwrap(), None);
    }

    #[test]
    fn init_writes_private_files_and_loads_the_same_keys() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::locate(Some(dir.path().join("h"))).unwrap();
        let keys = home.init("laptop", Role::Device).unwrap();
        for file in [SIGNING_KEY_FILE, KEM_KEY_FILE, CONFIG_FILE] {
            let mode = fs::metadata(home.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let mode = fs::metadata(home.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(home.load_keys().unwrap().device_id(), keys.device_id());
        assert_eq!(home.config().unwrap().name, "laptop");
        assert!(matches!(
            home.init("again", Role::Device),
            Err(HomeError::AlreadyInitialised { .. })
        ));
        assert_eq!(home.load_keys().unwrap().device_id(), keys.device_id());
    }

    #[test]
    fn static_peers_are_checked_and_kept_in_the_commented_config() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::locate(Some(dir.path().to_path_buf())).unwrap();
        assert!(matches!(
            home.add_peer("/ip4/10.0.0.2/tcp/1"),
            Err(HomeError::NotInitialised(_))
        ));
        home.init("x", Role::Device).unwrap();
        home.add_peer("/ip4/10.0.0.2/tcp/22000").unwrap();
        home.add_peer(" /ip4/10.0.0.3/udp/22000/quic-v1 ").unwrap();
        for bad in [
            "nonsense",
            "/ip4/10.0.0.2",
            "/ip4/10.0.0.2/udp/5",
            "/ip4/10.0.0.2/tcp/1/p2p-circuit",
        ] {
            assert!(
                matches!(home.add_peer(bad), Err(HomeError::PeerAddr(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            home.add_peer("/ip4/10.0.0.2/tcp/22000"),
            Err(HomeError::PeerAddr(PeerAddrError::Duplicate(_)))
        ));
        home.remove_peer("/ip4/10.0.0.2/tcp/22000").unwrap();
        assert!(home.remove_peer("/ip4/10.0.0.2/tcp/22000").is_err());
        assert_eq!(
            home.config().unwrap().peers,
            vec!["/ip4/10.0.0.3/udp/22000/quic-v1"]
        );
        let text = fs::read_to_string(home.path().join(CONFIG_FILE)).unwrap();
        assert!(
            text.contains("# The name other devices show"),
            "comments kept"
        );
        let mode = fs::metadata(home.path().join(CONFIG_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn loose_or_damaged_key_files_are_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::locate(Some(dir.path().to_path_buf())).unwrap();
        home.init("x", Role::Device).unwrap();
        let key = home.path().join(SIGNING_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
        let err = home.load_keys().unwrap_err().to_string();
        assert!(
            err.contains("chmod 600") && err.contains("ed25519.key"),
            "{err}"
        );
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&key, "# x\nnot hex\n").unwrap();
        assert!(matches!(
            home.load_keys(),
            Err(HomeError::BadKeyFile { .. })
        ));
        let empty = Home::locate(Some(dir.path().join("none"))).unwrap();
        assert!(matches!(
            empty.load_keys(),
            Err(HomeError::NotInitialised(_))
        ));
    }
}
