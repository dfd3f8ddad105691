//! What the CLI prints for people: each function turns one typed reply into text (no I/O, so
//! every format is snapshot-tested below). `--json` prints the reply itself instead.

use std::fmt::Write;

use crate::control::{
    Changed, ConflictCopy, DeviceInfo, DeviceStatus, FolderInfo, GcReport, IgnoreList, Removed,
    Restored, Status, StoragePeerStatus, VersionList,
};

/// `text` with control characters shown escaped (`\u{1b}`): names and paths come from other
/// devices and must not drive the terminal.
pub fn clean(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `meshsync status`.
pub fn status(status: &Status) -> String {
    match status {
        Status::Device(status) => device_status(status),
        Status::Storage(status) => storage_status(status),
    }
}

fn connected(yes: bool) -> &'static str {
    if yes {
        "connected"
    } else {
        "offline"
    }
}

fn device_status(status: &DeviceStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "device {}", status.device_id);
    for addr in &status.listen {
        let _ = writeln!(out, "  listening on {addr}");
    }
    let _ = writeln!(out, "peers:");
    for p in &status.peers {
        let _ = writeln!(
            out,
            "  {} {:<12} {:<8} {}  in {} B, out {} B",
            p.id,
            clean(&p.name),
            p.role,
            connected(p.connected),
            p.bytes_in,
            p.bytes_out
        );
    }
    let _ = writeln!(out, "folders:");
    for f in &status.folders {
        let held = if f.held_deletes > 0 {
            format!(
                "; {} deletions held back (run `meshsync scan --allow-deletes {}` if intended)",
                f.held_deletes, f.id
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  {} {}  {}  {} files, need {} files ({} B), {} conflicts{held}",
            clean(&f.id),
            clean(&f.path),
            folder_state(f),
            f.local_files,
            f.need_files,
            f.need_bytes,
            f.conflicts,
        );
        for path in f.unavailable.iter().take(LIST_AT_MOST) {
            let _ = writeln!(
                out,
                "    unavailable: {} (no source has intact data for it yet; not written)",
                clean(path)
            );
        }
        more_lines(&mut out, f.unavailable.len(), "unavailable");
        for n in f.not_written.iter().take(LIST_AT_MOST) {
            let _ = writeln!(
                out,
                "    not written: {}: {}",
                clean(&n.path),
                clean(&n.why)
            );
        }
        more_lines(&mut out, f.not_written.len(), "not written");
    }
    if !status.storage.is_empty() {
        let _ = writeln!(out, "storage peers:");
    }
    for s in &status.storage {
        let _ = writeln!(
            out,
            "  {} {}  holds this device's changes up to {} of {}{}",
            s.id,
            connected(s.connected),
            s.holds_my_changes,
            s.my_changes,
            if s.holds_latest { " (up to date)" } else { "" }
        );
        for report in &s.stale_reports {
            let _ = writeln!(out, "    WARNING: {report}");
        }
    }
    out
}

fn storage_status(status: &StoragePeerStatus) -> String {
    let mut out = String::new();
    let holds = &status.holds;
    let _ = writeln!(out, "storage peer {}", status.device_id);
    for addr in &status.listen {
        let _ = writeln!(out, "  listening on {addr}");
    }
    let _ = writeln!(
        out,
        "holds {} chunks ({:.1} MB of ciphertext, {:.1} MB on disk) and {} sealed changes; it has no key to read them",
        holds.chunks,
        holds.chunk_bytes as f64 / 1e6,
        holds.disk_bytes as f64 / 1e6,
        holds.sealed_changes
    );
    let _ = writeln!(out, "members:");
    for p in &status.peers {
        let state = if p.role != "device" {
            String::new()
        } else if p.up_to_date {
            format!("up to date (holds its changes up to {})", p.held_changes)
        } else {
            match p.device_changes {
                None => format!(
                    "holds its changes up to {} (not met since this storage peer started)",
                    p.held_changes
                ),
                Some(has) => format!("holds its changes up to {}, it has {has}", p.held_changes),
            }
        };
        let _ = writeln!(
            out,
            "  {} {:<8} {:<9} {state}",
            p.id,
            p.role,
            connected(p.connected)
        );
    }
    out
}

/// `meshsync devices`.
pub fn devices(list: &[DeviceInfo]) -> String {
    devices_at(list, crate::versions::now_secs())
}

/// [`devices`] as of `now` (Unix seconds).
fn devices_at(list: &[DeviceInfo], now: u64) -> String {
    let mut out = String::new();
    for d in list {
        let state = if d.this_device {
            "(this device)".to_string()
        } else if let Some(epoch) = d.removed_in {
            format!("removed (key epoch {epoch} started without it)")
        } else if d.connected {
            match d.addresses.first() {
                Some(addr) => format!("connected from {}", clean(addr)),
                None => "connected".to_string(),
            }
        } else {
            match d.last_seen {
                Some(at) => format!("offline, last seen {} ago", ago(now.saturating_sub(at))),
                None => "offline, never seen by this device".to_string(),
            }
        };
        let epoch = d
            .epoch
            .map(|e| format!(" key epoch {e}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{} {:<12} {:<9}{}{} {state}",
            d.id,
            clean(&d.name),
            d.role,
            if d.admin { " admin" } else { "" },
            epoch,
        );
    }
    out
}

/// A duration in the largest whole unit ("3 min", "2 h", "5 days").
fn ago(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7_199 => format!("{} min", secs / 60),
        7_200..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} days", secs / 86_400),
    }
}

/// `meshsync conflicts`.
pub fn conflicts(list: &[ConflictCopy]) -> String {
    if list.is_empty() {
        return "no conflicts\n".into();
    }
    let mut out = String::new();
    for c in list {
        let _ = writeln!(
            out,
            "{}/{}: other version kept as {}{}",
            clean(&c.folder),
            clean(&c.path),
            clean(&c.copy),
            if c.on_disk { "" } else { " (being written)" }
        );
    }
    out
}

/// `meshsync folder list`.
pub fn folders(list: &[FolderInfo]) -> String {
    list.iter()
        .map(|f| format!("{}  {}\n", clean(&f.id), clean(&f.path)))
        .collect()
}

/// `meshsync ignore`.
pub fn ignore(rules: &IgnoreList) -> String {
    let shared = rules.shared.iter().map(|l| ("shared", l));
    let local = rules.local.iter().map(|l| ("this device", l));
    shared
        .chain(local)
        .map(|(kind, line)| format!("{kind:<12} {}\n", clean(line)))
        .collect()
}

/// `meshsync versions`; `now` is the current Unix time in seconds.
pub fn versions(list: &VersionList, now: u64) -> String {
    if list.versions.is_empty() {
        return format!("no kept versions of {}\n", clean(&list.path));
    }
    list.versions
        .iter()
        .map(|v| {
            format!(
                "{:>3}  {:>12} bytes  replaced {}s ago{}\n",
                v.number,
                v.size,
                now.saturating_sub(v.replaced_at),
                if v.stored_here {
                    "  (stored on this device)"
                } else {
                    ""
                }
            )
        })
        .collect()
}

/// `meshsync restore`.
pub fn restored(done: &Restored) -> String {
    format!(
        "restored version {} of {} ({} bytes)\n",
        done.number,
        clean(&done.path),
        done.size
    )
}

/// `meshsync gc`.
pub fn gc(report: &GcReport) -> String {
    let mut out = format!(
        "forgot {} old versions past the retention; {} chunks no longer referenced, {} bytes freed here\n",
        report.expired_versions, report.unreferenced_chunks, report.freed_here_bytes
    );
    for r in &report.storage_peers {
        let _ = writeln!(
            out,
            "  storage peer {}: {} chunks deleted ({} bytes)",
            r.storage_peer.as_deref().unwrap_or("?"),
            r.chunks,
            r.bytes
        );
    }
    out
}

pub fn changed(c: &Changed) -> String {
    format!("{} ({}): {}\n", clean(&c.name), c.device_id, clean(&c.what))
}

pub fn removed(r: &Removed) -> String {
    format!(
        "removed {} ({})\nkey epoch {} started: the new mesh key is wrapped to {} device{}; \
         the removed device is let in no more and can read nothing written from now on\n",
        clean(&r.name),
        r.device_id,
        r.epoch,
        r.rekeyed,
        if r.rekeyed == 1 { "" } else { "s" },
    ) + &format!(
        "its changes after the last one this device holds are refused in {} folder{}, whatever key epoch they claim\n",
        r.cut_off,
        if r.cut_off == 1 { "" } else { "s" },
    ) + match r.wipe {
        Some(true) => "wipe ordered: it erases its folders, keys and state if it ever reaches a member or storage peer again (best effort)\n",
        Some(false) => "wipe ordered, but it did not accept remote wipe when it joined: it is only refused\n",
        None => "",
    }
}

/// A folder's state in one phrase.
pub fn folder_state(f: &crate::control::FolderStatus) -> &'static str {
    if f.waiting_for_peers {
        "waiting for another device"
    } else if f.in_sync {
        "in sync"
    } else {
        "syncing"
    }
}

/// How many paths of one kind `status` lists per folder (`--json` gives them all).
const LIST_AT_MOST: usize = 20;

/// "… and N more" after a list cut at [`LIST_AT_MOST`].
fn more_lines(out: &mut String, total: usize, what: &str) {
    if total > LIST_AT_MOST {
        let _ = writeln!(
            out,
            "    … and {} more {what} (`meshsync status --json` lists them all)",
            total - LIST_AT_MOST
        );
    }
}

#[cfg(test)]
mod tests {
    //! Every human-readable format, on fixed replies (IDs and times are fixed inputs, so the
    //! snapshots need no normalising).

    use super::*;
    use crate::control::*;

    const NOW: u64 = 1_790_000_000;
    const DEV_A: &str = "AAAAAAA-BBBBBBB-CCCCCCC-DDDDDDD-EEEEEEE-FFFFFFF-GGGGGGG-HHHHHHH";
    const DEV_B: &str = "BBBBBBB-CCCCCCC-DDDDDDD-EEEEEEE-FFFFFFF-GGGGGGG-HHHHHHH-IIIIIII";
    const DEV_S: &str = "SSSSSSS-TTTTTTT-UUUUUUU-VVVVVVV-WWWWWWW-XXXXXXX-YYYYYYY-ZZZZZZZ";

    #[test]
    fn device_status() {
        let status = Status::Device(DeviceStatus {
            device_id: DEV_A.into(),
            mesh_id: "mesh".into(),
            listen: vec!["/ip4/127.0.0.1/tcp/22000".into()],
            peers: vec![
                PeerStatus {
                    id: DEV_B.into(),
                    name: "desktop".into(),
                    role: "device".into(),
                    connected: true,
                    bytes_in: 1200,
                    bytes_out: 3400,
                },
                PeerStatus {
                    id: DEV_S.into(),
                    name: "nas".into(),
                    role: "storage".into(),
                    connected: false,
                    bytes_in: 0,
                    bytes_out: 0,
                },
            ],
            folders: vec![
                FolderStatus {
                    id: "docs".into(),
                    path: "/home/me/Documents".into(),
                    in_sync: true,
                    need_files: 0,
                    need_bytes: 0,
                    local_files: 42,
                    conflicts: 1,
                    held_deletes: 0,
                    unavailable: vec![],
                    waiting_for_peers: false,
                    not_written: vec![],
                },
                FolderStatus {
                    id: "photos".into(),
                    path: "/home/me/Pictures".into(),
                    in_sync: false,
                    need_files: 3,
                    need_bytes: 3_000_000,
                    local_files: 10,
                    conflicts: 0,
                    held_deletes: 12,
                    unavailable: vec!["2026/beach.jpg".into()],
                    waiting_for_peers: false,
                    not_written: vec![NotWritten {
                        path: "L/x.txt".into(),
                        why: "L/x.txt: L is a symlink or a file on this device, not a folder; nothing is written through it".into(),
                    }],
                },
            ],
            storage: vec![StorageReport {
                id: DEV_S.into(),
                connected: false,
                holds_my_changes: 7,
                holds: [(DEV_A.to_string(), 7)].into(),
                my_changes: 9,
                holds_latest: false,
                stale_reports: vec!["storage peer SSSSSSS rolled back".into()],
            }],
        });
        insta::assert_snapshot!(super::status(&status));
    }

    #[test]
    fn storage_peer_status() {
        let status = Status::Storage(StoragePeerStatus {
            device_id: DEV_S.into(),
            role: "storage".into(),
            mesh_id: Some("mesh".into()),
            listen: vec!["/ip4/127.0.0.1/tcp/22001".into()],
            peers: vec![
                StorageMember {
                    id: DEV_A.into(),
                    role: "device".into(),
                    connected: true,
                    bytes_in: 10,
                    bytes_out: 20,
                    held_changes: 9,
                    device_changes: Some(9),
                    up_to_date: true,
                },
                StorageMember {
                    id: DEV_B.into(),
                    role: "device".into(),
                    connected: false,
                    bytes_in: 0,
                    bytes_out: 0,
                    held_changes: 3,
                    device_changes: None,
                    up_to_date: false,
                },
            ],
            holds: Holdings {
                chunks: 120,
                chunk_bytes: 7_500_000,
                disk_bytes: 7_600_000,
                sealed_changes: 12,
                sealed_bytes: 40_000,
            },
        });
        insta::assert_snapshot!(super::status(&status));
    }

    #[test]
    fn control_characters_from_peers_are_shown_escaped() {
        let list = [DeviceInfo {
            id: DEV_B.into(),
            name: "evil\u{1b}[2J\u{7}".into(),
            role: "device".into(),
            admin: false,
            this_device: false,
            connected: true,
            last_seen: None,
            addresses: vec![],
            epoch: Some(0),
            removed_in: None,
            remote_wipe: false,
        }];
        let out = devices(&list);
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
        assert!(out.contains("evil\\u{1b}[2J\\u{7}"), "{out}");
    }

    #[test]
    fn devices_list() {
        let list = [
            DeviceInfo {
                id: DEV_A.into(),
                name: "laptop".into(),
                role: "device".into(),
                admin: true,
                this_device: true,
                connected: true,
                last_seen: None,
                addresses: vec!["/ip4/192.168.1.10/tcp/22000".into()],
                epoch: Some(1),
                removed_in: None,
                remote_wipe: false,
            },
            DeviceInfo {
                id: DEV_B.into(),
                name: "desktop".into(),
                role: "read-only".into(),
                admin: false,
                this_device: false,
                connected: false,
                last_seen: Some(NOW - 7_500),
                addresses: vec![],
                epoch: Some(1),
                removed_in: None,
                remote_wipe: false,
            },
            DeviceInfo {
                id: DEV_A.into(),
                name: "nas".into(),
                role: "device".into(),
                admin: true,
                this_device: false,
                connected: true,
                last_seen: Some(NOW),
                addresses: vec!["/ip4/192.168.1.20/tcp/22000".into()],
                epoch: Some(1),
                removed_in: None,
                remote_wipe: false,
            },
            DeviceInfo {
                id: DEV_B.into(),
                name: String::new(),
                role: "removed".into(),
                admin: false,
                this_device: false,
                connected: false,
                last_seen: Some(NOW - 900_000),
                addresses: vec![],
                epoch: None,
                removed_in: Some(1),
                remote_wipe: true,
            },
        ];
        insta::assert_snapshot!(devices_at(&list, NOW));
    }

    #[test]
    fn device_removed() {
        let mut removed = Removed {
            device_id: DEV_B.into(),
            name: "stolen laptop".into(),
            epoch: 2,
            rekeyed: 1,
            cut_off: 2,
            wipe: Some(true),
        };
        let mut out = super::removed(&removed);
        removed.wipe = Some(false);
        removed.cut_off = 1;
        out += &super::removed(&removed);
        insta::assert_snapshot!(out);
    }

    #[test]
    fn conflicts_list() {
        assert_eq!(conflicts(&[]), "no conflicts\n");
        let list = [
            ConflictCopy {
                folder: "docs".into(),
                path: "notes.txt".into(),
                copy: "notes.sync-conflict-20261128-010203-BBBBBBB.txt".into(),
                author: Some(DEV_B.into()),
                on_disk: true,
            },
            ConflictCopy {
                folder: "docs".into(),
                path: "plan.md".into(),
                copy: "plan.sync-conflict-20261129-101010-AAAAAAA.md".into(),
                author: None,
                on_disk: false,
            },
        ];
        insta::assert_snapshot!(conflicts(&list));
    }

    #[test]
    fn folders_ignore_versions_restore_gc() {
        let mut out = folders(&[FolderInfo {
            id: "docs".into(),
            path: "/home/me/Documents".into(),
        }]);
        out += &ignore(&IgnoreList {
            folder: "docs".into(),
            shared: vec!["*.log".into(), "build/".into()],
            local: vec!["!keep.log".into()],
        });
        let mut list = VersionList {
            folder: "docs".into(),
            path: "notes.txt".into(),
            versions: vec![],
        };
        out += &versions(&list, 1_000_000);
        list.versions = vec![
            VersionInfo {
                number: 1,
                version: 3,
                size: 1234,
                mtime_ns: 0,
                replaced_at: 999_940,
                stored_here: true,
            },
            VersionInfo {
                number: 2,
                version: 2,
                size: 99,
                mtime_ns: 0,
                replaced_at: 900_000,
                stored_here: false,
            },
        ];
        out += &versions(&list, 1_000_000);
        out += &restored(&Restored {
            folder: "docs".into(),
            path: "notes.txt".into(),
            number: 2,
            size: 99,
            chunks_from_this_device: 1,
            chunks_from_peers: 0,
        });
        out += &gc(&GcReport {
            expired_versions: 4,
            unreferenced_chunks: 6,
            freed_here_bytes: 300_000,
            storage_peers: vec![Released {
                storage_peer: Some(DEV_S.into()),
                chunks: 6,
                bytes: 310_000,
            }],
        });
        insta::assert_snapshot!(out);
    }
}
