//! Conflict copies: the name a losing version is kept under,
//! `name.sync-conflict-YYYYMMDD-HHMMSS-DEVICE.ext` (Syncthing's pattern: the modification time
//! of the losing version in UTC, the short ID of the device that made it), and back.

use meshsync_crdt::{DeviceId, FileRecord};

/// `name.sync-conflict-YYYYMMDD-HHMMSS-DEVICE.ext` for a losing version of `path`.
pub fn conflict_name(path: &str, loser: &FileRecord) -> String {
    conflict_name_for(path, loser.mtime_ns, &loser.author)
}

/// The conflict-copy name of a version of `path` modified at `mtime_ns` by `device`.
pub fn conflict_name_for(path: &str, mtime_ns: i64, device: &DeviceId) -> String {
    let secs = mtime_ns.div_euclid(1_000_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let stamp = format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    );
    let device = device.short();
    let (dir, file) = match path.rfind('/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => ("", path),
    };
    match file.rfind('.') {
        Some(i) if i > 0 => format!(
            "{dir}{}.sync-conflict-{stamp}-{device}{}",
            &file[..i],
            &file[i..]
        ),
        _ => format!("{dir}{file}.sync-conflict-{stamp}-{device}"),
    }
}

/// The path a conflict copy was made from (`a/b.sync-conflict-…-DEV.txt` → `a/b.txt`).
pub fn original_of_conflict(copy: &str) -> String {
    let Some(start) = copy.find(".sync-conflict-") else {
        return copy.to_string();
    };
    let rest = &copy[start + ".sync-conflict-".len()..];
    // YYYYMMDD-HHMMSS-DEVICE (7 characters), then the extension if any.
    let ext = rest.get(23..).unwrap_or("");
    format!("{}{ext}", &copy[..start])
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshsync_crdt::DeviceKeys;

    #[test]
    fn conflict_names_follow_the_syncthing_pattern_and_map_back() {
        let device = DeviceKeys::generate().device_id();
        // 2026-11-28 01:02:03 UTC
        let mtime = 1_795_827_723_000_000_000;
        let name = conflict_name_for("docs/report.final.pdf", mtime, &device);
        assert_eq!(
            name,
            format!(
                "docs/report.final.sync-conflict-20261128-010203-{}.pdf",
                device.short()
            )
        );
        assert_eq!(original_of_conflict(&name), "docs/report.final.pdf");
        let bare = conflict_name_for("Makefile", mtime, &device);
        assert_eq!(
            bare,
            format!("Makefile.sync-conflict-20261128-010203-{}", device.short())
        );
        assert_eq!(original_of_conflict(&bare), "Makefile");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
