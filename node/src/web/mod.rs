//! The local web page: what a person checks at a glance (devices, folders in sync or how far
//! from it, conflicts, old versions, storage peers) and the few things they do there (invite a
//! device with a QR code, keep one side of a conflict, allow a held delete, restore a version).
//!
//! Served by the daemon with axum on 127.0.0.1 only, server-rendered HTML; the live part of
//! the page is re-rendered every second and pushed by server-sent events (`/events`), a few
//! lines of plain JavaScript swap it in — no JavaScript toolchain.
//!
//! Everything goes through the same requests as the CLI ([`crate::control::Request`]), so the
//! page can do nothing the control socket cannot. Who gets in ([`guard`]):
//! - only requests whose `Host` is this loopback address (a DNS-rebinding page cannot name a
//!   host of its own and still reach us);
//! - only with the home's secret (`HOME/web-secret`, 0600): `meshsync web` prints a link
//!   carrying it, which sets an `HttpOnly`, `SameSite=Strict` cookie and redirects to a clean
//!   URL;
//! - a state-changing request also carries the CSRF token from the page's forms, and is
//!   refused if the browser says it comes from another origin;
//! - no page shows a key; an invite code is shown only until it expires or a device joins.

mod guard;
pub mod page;
mod rates;
mod routes;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

use crate::control::Request;

/// The secret every request must carry (hex), in the home.
pub const SECRET_FILE: &str = "web-secret";
/// Where the running daemon's page listens, in the home (written at start).
pub const ADDRESS_FILE: &str = "web-address";

/// How long the notice of an action stays on the page.
const NOTICE_SHOWN: std::time::Duration = std::time::Duration::from_secs(20);

/// Answers a request as the control socket would.
pub type Backend =
    Arc<dyn Fn(Request) -> BoxFuture<'static, anyhow::Result<serde_json::Value>> + Send + Sync>;

/// The page's shared state.
pub struct Web {
    backend: Backend,
    /// A storage peer's page: it shows, it changes nothing.
    read_only: bool,
    secret: String,
    csrf: String,
    port: u16,
    /// The last invite made on the page, shown until used or expired.
    invite: Mutex<Option<page::ShownInvite>>,
    /// One line to show after an action (what happened, or why not), for [`NOTICE_SHOWN`].
    notice: Mutex<Option<(String, std::time::Instant)>>,
    rates: rates::Rates,
}

impl Web {
    async fn ask<T: serde::de::DeserializeOwned>(&self, request: Request) -> anyhow::Result<T> {
        let value = (self.backend)(request).await?;
        Ok(serde_json::from_value(value)?)
    }

    fn notify(&self, text: impl Into<String>) {
        *self.notice.lock().expect("notice lock") = Some((text.into(), std::time::Instant::now()));
    }

    fn notice(&self) -> Option<String> {
        let notice = self.notice.lock().expect("notice lock");
        notice
            .as_ref()
            .filter(|(_, at)| at.elapsed() < NOTICE_SHOWN)
            .map(|(text, _)| text.clone())
    }
}

/// The home's web secret, made on first use (32 random bytes, hex, mode 0600).
pub fn secret(home: &Path) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = home.join(SECRET_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let text = text.trim().to_string();
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(text);
        }
    }
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness for the web secret"))?;
    let text = data_encoding::HEXLOWER.encode(&bytes);
    let tmp = home.join(format!("{SECRET_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(text)
}

/// Starts the page on 127.0.0.1:`port` (0: any free port) and records the address in the
/// home. Returns where it listens.
pub async fn start(
    home: &Path,
    port: u16,
    backend: Backend,
    read_only: bool,
) -> anyhow::Result<SocketAddr> {
    let secret = secret(home)?;
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot serve the web page on 127.0.0.1:{port}: {e}; set another `web_port` in \
                 config.toml (0 = any free port) or start with `meshsync up --no-web`"
            )
        })?;
    let addr = listener.local_addr()?;
    std::fs::write(home.join(ADDRESS_FILE), addr.to_string())?;
    let web = Arc::new(Web {
        backend,
        read_only,
        csrf: data_encoding::HEXLOWER.encode(
            blake3::keyed_hash(&blake3::hash(secret.as_bytes()).into(), b"csrf").as_bytes(),
        ),
        secret,
        port: addr.port(),
        invite: Mutex::new(None),
        notice: Mutex::new(None),
        rates: rates::Rates::default(),
    });
    let app = routes::router(web);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::warn!(%error, "the web page stopped");
        }
    });
    Ok(addr)
}

/// The link `meshsync web` prints: the running page's address with the home's secret.
pub fn link(home: &Path) -> anyhow::Result<String> {
    let addr = std::fs::read_to_string(home.join(ADDRESS_FILE)).map_err(|_| {
        anyhow::anyhow!(
            "no web page has run for this home yet: start the daemon with `meshsync up` (without \
             --no-web)"
        )
    })?;
    let addr: SocketAddr = addr.trim().parse()?;
    if std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).is_err() {
        anyhow::bail!(
            "the web page at {addr} does not answer: is the daemon running? Start it with \
             `meshsync up`"
        );
    }
    let secret = secret(home)?;
    Ok(format!("http://{addr}/?token={secret}"))
}
