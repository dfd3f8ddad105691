//! `meshsync service install|uninstall`: a systemd unit that runs `meshsync up` for one home,
//! started at boot (`--system`) or at login (`--user`), restarted if it fails, and sandboxed.
//!
//! The sandbox makes the whole file system read-only to the daemon (`ProtectSystem=strict`)
//! except the home and the synced folders (`ReadWritePaths=`). So the unit lists the folders
//! this home syncs when it is written: after `meshsync folder add`, run `service install`
//! again. The folders come from the running daemon if there is one, else from the home's
//! state. [`unit_text`] builds the unit (pure, tested below); nothing here runs `systemctl`:
//! the commands to run next are printed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use meshsync_crdt::Role;

use crate::control::{self, FolderInfo, Request};
use crate::home::Home;

const UNIT_NAME: &str = "meshsync.service";

#[derive(Debug, Subcommand)]
pub enum ServiceAction {
    /// Write a systemd unit that runs `meshsync up` for this home (sandboxed: it may write
    /// only the home and the synced folders; run it again after `meshsync folder add`).
    Install(ServiceArgs),
    /// Remove the unit `service install` wrote.
    Uninstall(ServiceArgs),
}

#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// A user service, started when you log in (the default):
    /// ~/.config/systemd/user/meshsync.service.
    #[arg(long, conflicts_with = "system")]
    pub user: bool,
    /// A system service, started at boot and run as you: /etc/systemd/system/meshsync.service
    /// (needs root).
    #[arg(long)]
    pub system: bool,
    /// Write the unit into DIR instead of systemd's directory (for packaging, or to look at it).
    #[arg(long, value_name = "DIR")]
    pub unit_dir: Option<PathBuf>,
}

/// A user unit or a system unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    User,
    System,
}

impl ServiceArgs {
    fn scope(&self) -> Scope {
        if self.system {
            Scope::System
        } else {
            Scope::User
        }
    }
}

impl Scope {
    /// `systemctl` or `systemctl --user`.
    fn systemctl(self) -> &'static str {
        match self {
            Scope::User => "systemctl --user",
            Scope::System => "systemctl",
        }
    }

    /// The directory systemd reads this scope's units from.
    fn unit_dir(self) -> anyhow::Result<PathBuf> {
        match self {
            Scope::System => Ok(PathBuf::from("/etc/systemd/system")),
            Scope::User => {
                let config = match std::env::var_os("XDG_CONFIG_HOME") {
                    Some(dir) if !dir.is_empty() => PathBuf::from(dir),
                    _ => directories::BaseDirs::new()
                        .context("no home directory found for this user: pass --unit-dir DIR")?
                        .home_dir()
                        .join(".config"),
                };
                Ok(config.join("systemd/user"))
            }
        }
    }
}

/// What a unit is made of.
#[derive(Debug, Clone)]
pub struct UnitSpec {
    pub scope: Scope,
    /// The `meshsync` binary (absolute).
    pub exe: PathBuf,
    /// The home (absolute).
    pub home: PathBuf,
    /// The synced folders (absolute); each may be missing when the service starts.
    pub folders: Vec<PathBuf>,
    /// The account a system service runs as.
    pub user: Option<String>,
}

/// The unit file for `spec`.
pub fn unit_text(spec: &UnitSpec) -> anyhow::Result<String> {
    let flag = match spec.scope {
        Scope::User => "--user",
        Scope::System => "--system",
    };
    let mut writable = vec![unit_word(&spec.home)?];
    for folder in &spec.folders {
        // `-`: a folder missing at start (an unplugged disk) must not stop the daemon.
        writable.push(unit_word(&Path::new("-").join(folder.strip_prefix("/")?))?);
    }
    let mut text = format!(
        "# Written by `meshsync service install {flag}`. The daemon may write only the paths in\n\
         # ReadWritePaths: after `meshsync folder add`, run `meshsync service install {flag}` again.\n\
         [Unit]\n\
         Description=meshsync folder sync (home {home})\n"
    , home = spec.home.display().to_string().replace('%', "%%"));
    if spec.scope == Scope::System {
        text.push_str("Wants=network-online.target\nAfter=network-online.target\n");
    }
    text.push_str("\n[Service]\nType=notify\nNotifyAccess=main\n");
    if let Some(user) = &spec.user {
        text.push_str(&format!("User={user}\n"));
    }
    text.push_str(&format!(
        "Environment={}\nExecStart={} up\n",
        unit_word(&PathBuf::from(format!(
            "MESHSYNC_HOME={}",
            spec.home.display()
        )))?,
        unit_word(&spec.exe)?.replace('$', "$$"),
    ));
    text.push_str(
        "Restart=on-failure\nRestartSec=5s\nWatchdogSec=60s\nTimeoutStopSec=30s\n\
         \n# Sandbox: the file system is read-only but for the home and the synced folders.\n\
         ProtectSystem=strict\n",
    );
    text.push_str(&format!("ReadWritePaths={}\n", writable.join(" ")));
    text.push_str(HARDENING);
    text.push_str(match spec.scope {
        Scope::User => "\n[Install]\nWantedBy=default.target\n",
        Scope::System => "\n[Install]\nWantedBy=multi-user.target\n",
    });
    Ok(text)
}

/// Sandboxing that costs the daemon nothing: it needs no devices, kernel settings, new
/// privileges or namespaces, and only IP, Unix and netlink (interface changes) sockets.
const HARDENING: &str = "NoNewPrivileges=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
";

/// A path as one quoted word of a unit file: `%` (specifiers) doubled, `\` and `"` escaped.
fn unit_word(path: &Path) -> anyhow::Result<String> {
    let text = path.to_str().with_context(|| {
        format!(
            "{} is not UTF-8, which a systemd unit cannot name; rename it",
            path.display()
        )
    })?;
    if text.chars().any(char::is_control) {
        anyhow::bail!(
            "{text:?} holds a control character, which a systemd unit cannot name; rename it"
        );
    }
    let escaped = text
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('%', "%%");
    Ok(format!("\"{escaped}\""))
}

/// `meshsync service install`.
pub fn install(home: &Home, args: &ServiceArgs) -> anyhow::Result<()> {
    let scope = args.scope();
    home.load_keys()?;
    let home_dir = fs::canonicalize(home.path())
        .with_context(|| format!("finding the absolute path of {}", home.path().display()))?;
    if in_private_tmp(&home_dir) {
        anyhow::bail!(
            "the home {} is under /tmp or /var/tmp, which the service sees empty (PrivateTmp=yes); \
             make a home elsewhere (`meshsync --home DIR init`) to run meshsync as a service",
            home_dir.display()
        );
    }
    let (folders, daemon_running) = synced_folders(home)?;
    for folder in folders.iter().filter(|f| in_private_tmp(f)) {
        println!(
            "warning: {} is under /tmp or /var/tmp, which the service sees empty (PrivateTmp=yes): \
             it will not sync there; move the folder to sync it",
            folder.display()
        );
    }
    let exe = std::env::current_exe()
        .and_then(fs::canonicalize)
        .context("finding this meshsync binary's path for ExecStart")?;
    let user = match scope {
        Scope::System => Some(invoking_user()?),
        Scope::User => None,
    };
    let spec = UnitSpec {
        scope,
        exe,
        home: home_dir,
        folders,
        user,
    };
    let dir = match &args.unit_dir {
        Some(dir) => dir.clone(),
        None => scope.unit_dir()?,
    };
    let path = dir.join(UNIT_NAME);
    let existed = path.exists();
    write_unit(&path, &unit_text(&spec)?)?;
    print_installed(&spec, &path, existed, daemon_running);
    Ok(())
}

fn print_installed(spec: &UnitSpec, path: &Path, existed: bool, daemon_running: bool) {
    let systemctl = spec.scope.systemctl();
    println!(
        "{} {} (runs `{} up` for home {})",
        if existed { "updated" } else { "wrote" },
        path.display(),
        spec.exe.display(),
        spec.home.display()
    );
    if spec.folders.is_empty() {
        println!("it may write the home (no synced folders yet)");
    } else {
        println!("it may write the home and these synced folders:");
    }
    for folder in &spec.folders {
        println!("  {}", folder.display());
    }
    println!(
        "after `meshsync folder add`, run this command again (the service may write only these)"
    );
    if daemon_running {
        println!("a daemon runs for this home now: stop it before starting the service (one daemon per home)");
    }
    if spec.scope == Scope::User {
        println!("to start it at boot rather than at login: loginctl enable-linger $USER");
    }
    println!("next:");
    if existed {
        println!("{systemctl} daemon-reload && {systemctl} restart meshsync");
    } else {
        println!("{systemctl} daemon-reload && {systemctl} enable --now meshsync");
    }
}

/// `meshsync service uninstall`: the unit and the links `systemctl enable` made to it.
pub fn uninstall(args: &ServiceArgs) -> anyhow::Result<()> {
    let scope = args.scope();
    let dir = match &args.unit_dir {
        Some(dir) => dir.clone(),
        None => scope.unit_dir()?,
    };
    let path = dir.join(UNIT_NAME);
    if !path.exists() {
        let other = match scope {
            Scope::User => "--system",
            Scope::System => "--user",
        };
        anyhow::bail!(
            "there is no {} to remove; was it installed with {other} (or --unit-dir)?",
            path.display()
        );
    }
    for target in ["default.target.wants", "multi-user.target.wants"] {
        let link = dir.join(target).join(UNIT_NAME);
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
    }
    fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    let systemctl = scope.systemctl();
    println!("removed {}", path.display());
    println!("next, to stop the running service and forget it:");
    println!("{systemctl} stop meshsync && {systemctl} daemon-reload");
    Ok(())
}

/// The synced folders, from the running daemon or else the home's state; and whether a
/// daemon runs.
fn synced_folders(home: &Home) -> anyhow::Result<(Vec<PathBuf>, bool)> {
    if home.config()?.role().map_err(anyhow::Error::msg)? == Role::Storage {
        return Ok((Vec::new(), running(home)));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let asked: Option<Vec<FolderInfo>> =
        runtime.block_on(control::call(home.path(), &Request::FolderList))?;
    if let Some(list) = asked {
        return Ok((
            list.into_iter().map(|f| PathBuf::from(f.path)).collect(),
            true,
        ));
    }
    if !home.path().join("state.redb").exists() {
        return Ok((Vec::new(), false));
    }
    let state = crate::state::State::open(home.path())?;
    Ok((state.folders()?.into_values().collect(), false))
}

/// Whether the unit's private /tmp hides `path`.
fn in_private_tmp(path: &Path) -> bool {
    path.starts_with("/tmp") || path.starts_with("/var/tmp")
}

fn running(home: &Home) -> bool {
    std::os::unix::net::UnixStream::connect(control::socket_path(home.path())).is_ok()
}

/// Writes the unit (mode 0644) through a temp file, so systemd never reads half of one.
fn write_unit(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| {
        format!(
            "creating {} (for a system unit, run as root)",
            dir.display()
        )
    })?;
    let tmp = dir.join(".meshsync.service.tmp");
    let _ = fs::remove_file(&tmp);
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(text.as_bytes())?;
            file.sync_all()
        });
    written
        .and_then(|()| fs::rename(&tmp, path))
        .with_context(|| {
            format!(
                "writing {} (for a system unit, run as root; or pass --unit-dir DIR)",
                path.display()
            )
        })
}

/// Who a system service runs as: the user behind `sudo`, else the one running this.
fn invoking_user() -> anyhow::Result<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        if let Ok(user) = std::env::var("SUDO_USER") {
            if !user.is_empty() {
                return Ok(user);
            }
        }
    }
    user_name(uid).with_context(|| format!("user {uid} has no name in the user database; run this as the user the service should run as"))
}

fn user_name(uid: u32) -> Option<String> {
    let mut buffer = vec![0u8; 4096];
    // SAFETY: a zeroed passwd is a valid out-parameter; getpwuid_r writes into it and the
    // buffer (of the length given) only, and the name it points to lives in that buffer.
    unsafe {
        let mut entry: libc::passwd = std::mem::zeroed();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            uid,
            &mut entry,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            &mut found,
        );
        if rc != 0 || found.is_null() || entry.pw_name.is_null() {
            return None;
        }
        let name = std::ffi::CStr::from_ptr(entry.pw_name);
        name.to_str().ok().map(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(scope: Scope) -> UnitSpec {
        UnitSpec {
            scope,
            exe: PathBuf::from("/usr/local/bin/meshsync"),
            home: PathBuf::from("/home/ann/.local/share/meshsync"),
            folders: vec![
                PathBuf::from("/home/ann/Documents"),
                PathBuf::from("/home/ann/100% \"done\""),
            ],
            user: (scope == Scope::System).then(|| "ann".to_string()),
        }
    }

    #[test]
    fn a_user_unit_runs_up_for_the_home_and_may_write_only_it_and_the_folders() {
        let text = unit_text(&spec(Scope::User)).unwrap();
        for line in [
            "Type=notify",
            "Environment=\"MESHSYNC_HOME=/home/ann/.local/share/meshsync\"",
            "ExecStart=\"/usr/local/bin/meshsync\" up",
            "ProtectSystem=strict",
            "ReadWritePaths=\"/home/ann/.local/share/meshsync\" \"-/home/ann/Documents\" \"-/home/ann/100%% \\\"done\\\"\"",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "Restart=on-failure",
            "WatchdogSec=60s",
            "WantedBy=default.target",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(!text.contains("User="), "{text}");
        assert!(!text.contains("ProtectHome"), "folders live in home dirs");
    }

    #[test]
    fn a_system_unit_runs_as_the_user_after_the_network() {
        let text = unit_text(&spec(Scope::System)).unwrap();
        for line in [
            "User=ann",
            "After=network-online.target",
            "WantedBy=multi-user.target",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn a_dollar_in_the_binary_path_is_not_expanded() {
        let mut spec = spec(Scope::User);
        spec.exe = PathBuf::from("/opt/$x/meshsync");
        let text = unit_text(&spec).unwrap();
        assert!(
            text.contains("ExecStart=\"/opt/$$x/meshsync\" up"),
            "{text}"
        );
    }
}
