//! The page's HTML, rendered on the server from what the daemon answered. Every value from
//! the daemon, a peer or the disk goes through [`esc`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use crate::control::{
    ConflictCopy, DeviceInfo, DeviceStatus, FolderStatus, KeptFile, Status, StoragePeerStatus,
    StorageReport, VersionList,
};
use crate::disk::FolderRoot;

/// Bytes of each side of a conflict shown side by side.
const PREVIEW_BYTES: usize = 4096;

/// An invite made on the page: shown until it expires or a new member appears.
#[derive(Clone)]
pub struct ShownInvite {
    pub code: String,
    pub role: String,
    pub expires_at: u64,
    pub members_before: BTreeSet<String>,
}

impl ShownInvite {
    /// Whether it may no longer be shown: expired, or a device joined since it was made.
    pub fn spent(&self, members: &BTreeSet<String>) -> bool {
        crate::versions::now_secs() >= self.expires_at
            || members.iter().any(|m| !self.members_before.contains(m))
    }
}

/// What one rendering shows.
pub struct View {
    pub status: Result<Status, String>,
    pub devices: Vec<DeviceInfo>,
    pub conflicts: Vec<ConflictCopy>,
    pub kept: Vec<(KeptFile, VersionList)>,
    pub invite: Option<ShownInvite>,
    pub notice: Option<String>,
    /// Per member: the last minute of (in, out) bytes/s.
    pub peer_rates: BTreeMap<String, Vec<(f64, f64)>>,
    /// Per folder: its rate (bytes/s) and, while syncing, (bytes received, most needed).
    pub folder_rates: BTreeMap<String, (f64, Option<(u64, u64)>)>,
}

/// Escapes text for HTML content and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The whole page.
pub fn page(view: &View, csrf: &str, read_only: bool) -> String {
    let title = match &view.status {
        Ok(Status::Storage(_)) => "meshsync — storage peer",
        _ => "meshsync",
    };
    let invite_form = if read_only {
        String::new()
    } else {
        format!(
            r#"<section id="new-invite"><h2>Add a device</h2>
<form method="post" action="/invite">{}
<label>Role <select name="role"><option value="device">device (reads and writes)</option>
<option value="read-only">read-only</option><option value="storage">storage peer (ciphertext only)</option></select></label>
<label>Valid for <input name="minutes" type="number" min="1" value="60"> minutes</label>
<button type="submit" id="make-invite">Make an invite</button></form></section>"#,
            csrf_input(csrf)
        )
    };
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><link rel="stylesheet" href="/style.css"></head>
<body><header><h1>{title}</h1><span id="live-state">live</span></header>
<main id="live">{}</main>{invite_form}
<script src="/app.js"></script></body></html>"#,
        live(view, csrf, read_only)
    )
}

/// The part that changes: re-rendered every second.
pub fn live(view: &View, csrf: &str, read_only: bool) -> String {
    let mut out = String::new();
    if let Some(notice) = &view.notice {
        let _ = write!(out, r#"<p class="notice">{}</p>"#, esc(notice));
    }
    match &view.status {
        Err(error) => {
            let _ = write!(
                out,
                r#"<p class="problem">The daemon did not answer: {}</p>"#,
                esc(error)
            );
        }
        Ok(Status::Device(status)) => {
            out.push_str(&invite(view));
            out.push_str(&members(view, &status.device_id));
            out.push_str(&folders(status, view, csrf));
            out.push_str(&conflicts(status, view, csrf));
            out.push_str(&versions(view, csrf));
            out.push_str(&storage(&status.storage));
        }
        Ok(Status::Storage(status)) => out.push_str(&storage_peer(status, view)),
    }
    if read_only {
        out.push_str(
            r#"<p class="muted">This page only shows: a storage peer changes nothing.</p>"#,
        );
    }
    out
}

fn csrf_input(csrf: &str) -> String {
    format!(r#"<input type="hidden" name="csrf" value="{}">"#, esc(csrf))
}

fn invite(view: &View) -> String {
    let Some(invite) = &view.invite else {
        return String::new();
    };
    let qr = qrcode::QrCode::new(invite.code.as_bytes())
        .map(|qr| {
            qr.render::<qrcode::render::svg::Color>()
                .min_dimensions(220, 220)
                .build()
        })
        .unwrap_or_default();
    let left = invite
        .expires_at
        .saturating_sub(crate::versions::now_secs());
    format!(
        r#"<section id="invite"><h2>Invite ({role})</h2>
<p>On the new device run <code>meshsync join CODE</code> with this code, or scan it. It works once and
expires in {left}; it disappears from this page when a device joins with it.</p>
<div class="invite"><div class="qr">{qr}</div><pre id="invite-code">{code}</pre></div></section>"#,
        role = esc(&invite.role),
        left = duration(left),
        code = esc(&invite.code),
    )
}

fn members(view: &View, me: &str) -> String {
    let mut rows = String::new();
    for d in &view.devices {
        let seen = if d.this_device {
            "this device".to_string()
        } else if d.connected {
            "connected".to_string()
        } else if let Some(at) = d.last_seen {
            format!(
                "last seen {} ago",
                duration(crate::versions::now_secs().saturating_sub(at))
            )
        } else {
            "never seen".to_string()
        };
        let rates = view.peer_rates.get(&d.id).cloned().unwrap_or_default();
        let (rate_in, rate_out) = rates.last().copied().unwrap_or((0.0, 0.0));
        let bytes = peer_bytes(view, &d.id);
        let _ = write!(
            rows,
            r#"<tr class="member{cls}" data-id="{id}"><td>{name}{admin}</td><td>{role}</td><td class="seen">{seen}</td>
<td>{bin} in / {bout} out</td><td>{rin}/s in, {rout}/s out</td><td>{chart}</td></tr>"#,
            cls = if d.connected { " connected" } else { "" },
            id = esc(&d.id),
            name = esc(&d.name),
            admin = if d.admin {
                " <small>(admin)</small>"
            } else {
                ""
            },
            role = esc(&d.role),
            seen = esc(&seen),
            bin = size(bytes.0),
            bout = size(bytes.1),
            rin = size(rate_in as u64),
            rout = size(rate_out as u64),
            chart = sparkline(&rates),
        );
    }
    format!(
        r#"<section id="devices"><h2>Devices</h2><p class="muted">This device: <code>{}</code></p>
<table><tr><th>Name</th><th>Role</th><th>State</th><th>Traffic</th><th>Rate</th><th>Last minute</th></tr>{rows}</table></section>"#,
        esc(me)
    )
}

fn peer_bytes(view: &View, id: &str) -> (u64, u64) {
    match &view.status {
        Ok(Status::Device(d)) => d
            .peers
            .iter()
            .find(|p| p.id == id)
            .map_or((0, 0), |p| (p.bytes_in, p.bytes_out)),
        Ok(Status::Storage(s)) => s
            .peers
            .iter()
            .find(|p| p.id == id)
            .map_or((0, 0), |p| (p.bytes_in, p.bytes_out)),
        Err(_) => (0, 0),
    }
}

/// A small line chart of the last minute's in+out rate.
fn sparkline(rates: &[(f64, f64)]) -> String {
    let (w, h) = (120.0, 24.0);
    let max = rates.iter().map(|(i, o)| i + o).fold(1.0_f64, f64::max);
    let points: Vec<String> = rates
        .iter()
        .enumerate()
        .map(|(n, (i, o))| {
            let x = w * n as f64 / 59.0;
            let y = h - (i + o) / max * (h - 2.0) - 1.0;
            format!("{x:.1},{y:.1}")
        })
        .collect();
    format!(
        r##"<svg class="spark" width="120" height="24" viewBox="0 0 120 24" role="img" aria-label="transfer rate, last minute"><polyline fill="none" stroke="#2a7" stroke-width="1.5" points="{}"/></svg>"##,
        points.join(" ")
    )
}

fn folders(status: &DeviceStatus, view: &View, csrf: &str) -> String {
    let mut out = String::from(r#"<section id="folders"><h2>Folders</h2>"#);
    if status.folders.is_empty() {
        out.push_str("<p>No folders yet: add one with <code>meshsync folder add PATH</code>.</p>");
    }
    for f in &status.folders {
        let (rate, progress) = view.folder_rates.get(&f.id).copied().unwrap_or_default();
        out.push_str(&folder(f, rate, progress, csrf));
    }
    out.push_str("</section>");
    out
}

fn folder(f: &FolderStatus, rate: f64, progress: Option<(u64, u64)>, csrf: &str) -> String {
    let files = f.local_files as u64 + f.need_files;
    // Bytes while syncing (big files show progress before they land), else files.
    let (value, max) = match progress {
        Some((done, most)) if !f.in_sync && most > 0 => (done, most),
        _ if files == 0 => (1, 1),
        _ => (f.local_files as u64, files),
    };
    let (state, detail) = if f.waiting_for_peers {
        (
            "waiting for another device".to_string(),
            "no device that syncs this folder has answered yet".to_string(),
        )
    } else if f.in_sync {
        ("in sync".to_string(), format!("{} files", f.local_files))
    } else {
        let left = progress.map_or(f.need_bytes, |(done, most)| most.saturating_sub(done));
        let eta = if rate > 1.0 {
            format!(", about {} left", duration((left as f64 / rate) as u64))
        } else {
            String::new()
        };
        (
            "syncing".to_string(),
            format!(
                "needs {} files, {} ({}/s{eta})",
                f.need_files,
                size(f.need_bytes),
                size(rate as u64)
            ),
        )
    };
    let mut out = format!(
        r#"<div class="folder" id="folder-{id}" data-id="{id}"><h3>{path}</h3>
<p><span class="state {cls}">{state}</span> <span class="detail">{detail}</span></p>
<progress max="{max}" value="{value}"></progress>"#,
        max = max.max(1),
        id = esc(&f.id),
        path = esc(&f.path),
        cls = if f.in_sync && !f.waiting_for_peers {
            "in-sync"
        } else {
            "syncing"
        },
    );
    if f.conflicts > 0 {
        let _ = write!(out, "<p>{} conflicts (below)</p>", f.conflicts);
    }
    if f.held_deletes > 0 {
        let _ = write!(
            out,
            r#"<form method="post" action="/allow-deletes" class="held">{}<input type="hidden" name="folder" value="{}">
<p class="problem">{} deletions held by the mass-delete guard (more than half of the folder).
<button type="submit">Allow the deletions</button></p></form>"#,
            csrf_input(csrf),
            esc(&f.id),
            f.held_deletes
        );
    }
    for path in &f.unavailable {
        let _ = write!(
            out,
            r#"<p class="problem">{}: no device or storage peer has intact content for it</p>"#,
            esc(path)
        );
    }
    for n in &f.not_written {
        let _ = write!(
            out,
            r#"<p class="problem">{}: not written here: {}</p>"#,
            esc(&n.path),
            esc(&n.why)
        );
    }
    out.push_str("</div>");
    out
}

fn conflicts(status: &DeviceStatus, view: &View, csrf: &str) -> String {
    if view.conflicts.is_empty() {
        return r#"<section id="conflicts"><h2>Conflicts</h2><p>None.</p></section>"#.into();
    }
    let mut out = String::from(r#"<section id="conflicts"><h2>Conflicts</h2>"#);
    for c in &view.conflicts {
        let root = status
            .folders
            .iter()
            .find(|f| f.id == c.folder)
            .and_then(|f| FolderRoot::open(std::path::Path::new(&f.path)).ok());
        let side = |rel: &str, title: String, keep: &str| {
            let (preview, present) = match &root {
                Some(root) => preview(root, rel),
                None => ("(folder not found)".into(), false),
            };
            let button = if present && c.on_disk {
                format!(
                    r#"<form method="post" action="/resolve">{}<input type="hidden" name="folder" value="{}">
<input type="hidden" name="copy" value="{}"><input type="hidden" name="keep" value="{keep}">
<button type="submit" class="keep-{keep}">Keep this one</button></form>"#,
                    csrf_input(csrf),
                    esc(&c.folder),
                    esc(&c.copy)
                )
            } else {
                String::new()
            };
            format!(
                r#"<div class="side"><h4>{}</h4><pre>{}</pre>{button}</div>"#,
                esc(&title),
                esc(&preview)
            )
        };
        let by = c.author.as_deref().map(short).unwrap_or("another device");
        let _ = write!(
            out,
            r#"<div class="conflict" data-path="{}"><h3>{}</h3><div class="sides">{}{}</div></div>"#,
            esc(&c.path),
            esc(&c.path),
            side(&c.path, format!("Current: {}", c.path), "original"),
            side(
                &c.copy,
                format!("Conflict copy from {by}: {}", c.copy),
                "copy"
            ),
        );
    }
    out.push_str("</section>");
    out
}

/// The start of a file as text (or what it is if not text), and whether it is there.
fn preview(root: &FolderRoot, rel: &str) -> (String, bool) {
    use std::io::Read;
    let Ok(file) = root.open_read(rel) else {
        return ("(not on this device)".into(), false);
    };
    let mut bytes = Vec::new();
    let _ = file.take(PREVIEW_BYTES as u64 + 1).read_to_end(&mut bytes);
    let cut = bytes.len() > PREVIEW_BYTES;
    bytes.truncate(PREVIEW_BYTES);
    match std::str::from_utf8(&bytes) {
        Ok(text) if cut => (format!("{text}\n…"), true),
        Ok(text) => (text.to_string(), true),
        Err(_) => (
            format!("(binary, {} bytes shown of more)", bytes.len()),
            true,
        ),
    }
}

fn versions(view: &View, csrf: &str) -> String {
    let mut out = String::from(r#"<section id="versions"><h2>Old versions</h2>"#);
    if view.kept.is_empty() {
        out.push_str("<p>None kept yet.</p>");
    }
    for (file, list) in &view.kept {
        let _ = write!(
            out,
            r#"<div class="kept" data-path="{}"><h3>{}</h3><table>"#,
            esc(&file.path),
            esc(&file.path)
        );
        for v in &list.versions {
            let _ = write!(
                out,
                r#"<tr><td>#{n}</td><td>{size}</td><td>replaced {ago} ago</td><td>{here}</td><td>
<form method="post" action="/restore">{csrf}<input type="hidden" name="path" value="{path}">
<input type="hidden" name="number" value="{n}"><button type="submit" class="restore">Restore</button></form></td></tr>"#,
                n = v.number,
                size = size(v.size),
                ago = duration(crate::versions::now_secs().saturating_sub(v.replaced_at)),
                here = if v.stored_here {
                    "stored here"
                } else {
                    "from peers"
                },
                csrf = csrf_input(csrf),
                path = esc(&file.absolute),
            );
        }
        out.push_str("</table></div>");
    }
    out.push_str("</section>");
    out
}

fn storage(reports: &[StorageReport]) -> String {
    let mut out = String::from(r#"<section id="storage"><h2>Storage peers</h2>"#);
    if reports.is_empty() {
        out.push_str("<p>None in this mesh.</p>");
    }
    for r in reports {
        let _ = write!(
            out,
            r#"<div class="storage-peer"><h3>{}</h3><p>{} · {}</p>"#,
            esc(short(&r.id)),
            if r.connected {
                "connected"
            } else {
                "not connected"
            },
            if r.holds_latest {
                format!(
                    "holds this device's latest changes ({} of {})",
                    r.holds_my_changes, r.my_changes
                )
            } else {
                format!(
                    "behind: holds {} of this device's {} changes",
                    r.holds_my_changes, r.my_changes
                )
            },
        );
        for stale in &r.stale_reports {
            let _ = write!(out, r#"<p class="problem">{}</p>"#, esc(stale));
        }
        out.push_str("</div>");
    }
    out.push_str("</section>");
    out
}

fn storage_peer(status: &StoragePeerStatus, view: &View) -> String {
    let mut out = format!(
        r#"<section id="storage-peer"><h2>Storage peer <code>{}</code></h2>
<p>Holds {} chunks ({}) and {} sealed changes ({}) — ciphertext only: no names, no contents.</p>"#,
        esc(&status.device_id),
        status.holds.chunks,
        size(status.holds.chunk_bytes),
        status.holds.sealed_changes,
        size(status.holds.sealed_bytes),
    );
    out.push_str("<table><tr><th>Member</th><th>Role</th><th>State</th><th>Traffic</th><th>Changes held</th><th>Last minute</th></tr>");
    for m in &status.peers {
        let rates = view.peer_rates.get(&m.id).cloned().unwrap_or_default();
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} in / {} out</td><td>{}{}</td><td>{}</td></tr>",
            esc(short(&m.id)),
            esc(&m.role),
            if m.connected { "connected" } else { "not connected" },
            size(m.bytes_in),
            size(m.bytes_out),
            m.held_changes,
            if m.up_to_date { " (up to date)" } else { "" },
            sparkline(&rates),
        );
    }
    out.push_str("</table></section>");
    out
}

fn short(id: &str) -> &str {
    id.split('-').next().unwrap_or(id)
}

/// Bytes for people: 1.5 MB.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Seconds for people: 45 s, 12 min, 3 h, 2 d.
pub fn duration(secs: u64) -> String {
    match secs {
        0..=89 => format!("{secs} s"),
        90..=5399 => format!("{} min", secs / 60),
        5400..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_peers_cannot_become_markup() {
        assert_eq!(
            esc(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        assert_eq!(size(999), "999 B");
        assert_eq!(size(1_500_000), "1.5 MB");
        assert_eq!(duration(3600), "60 min");
    }
}
