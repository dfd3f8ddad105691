//! The local web page lets nobody else in: raw HTTP requests against a real daemon's page,
//! as a stranger, a DNS-rebinding page (foreign `Host`), another site's form (foreign
//! `Origin`, no CSRF token) would send them. A storage peer's page changes nothing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;

use meshsync_tests::*;

/// One HTTP/1.1 request; returns (status, headers, body).
fn http(addr: &str, request: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("the page listens");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn get(addr: &str, host: &str, path: &str, cookie: Option<&str>) -> (u16, String, String) {
    let cookie = cookie.map_or(String::new(), |c| format!("Cookie: meshsync_web={c}\r\n"));
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{cookie}Connection: close\r\n\r\n"),
    )
}

fn post(addr: &str, path: &str, cookie: &str, extra: &str, body: &str) -> (u16, String, String) {
    http(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: meshsync_web={cookie}\r\n{extra}\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// The CSRF token in the page's forms.
fn csrf_of(page: &str) -> String {
    let at = page
        .find(r#"name="csrf" value=""#)
        .expect("a form with a CSRF token");
    let rest = &page[at + r#"name="csrf" value=""#.len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

/// Every secret in the home (key files, the web secret) as the text a page could leak.
fn home_secrets(home: &Path) -> Vec<String> {
    let mut secrets = Vec::new();
    for dir in [home.to_path_buf(), home.join("keys")] {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.ends_with(".key") || name == "web-secret" {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                secrets.extend(
                    text.lines()
                        .filter(|l| !l.starts_with('#') && l.trim().len() >= 32)
                        .map(|l| l.trim().to_string()),
                );
            }
        }
    }
    secrets
}

#[test]
fn the_page_refuses_strangers_foreign_hosts_and_other_sites() {
    let root = tempfile::tempdir().unwrap();
    let home = root.path().join("a");
    meshsync_ok(&home, &["init", "--name", "alice"]);
    let _a = Daemon::start_with_web(&home);
    let (addr, token) = web_link(&home);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    // No secret, a wrong one: refused, and told how to get in.
    let (status, _, body) = get(&addr, &addr, "/", None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("meshsync web"), "{body}");
    assert_eq!(get(&addr, &addr, "/?token=0123", None).0, 401);
    assert_eq!(get(&addr, &addr, "/events", Some("wrong")).0, 401);

    // The link: a strict, script-proof cookie, and a redirect to a URL without the secret.
    let (status, head, _) = get(&addr, &addr, &format!("/?token={token}"), None);
    assert_eq!(status, 303, "{head}");
    let cookie_line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a cookie");
    assert!(cookie_line.contains("HttpOnly") && cookie_line.contains("SameSite=Strict"));
    assert!(head.to_ascii_lowercase().contains("location: /\r") || head.ends_with("location: /"));

    // With the cookie the page answers — but only under a loopback Host (DNS rebinding).
    let (status, head, page) = get(&addr, &addr, "/", Some(&token));
    assert_eq!(status, 200, "{head}");
    assert!(page.contains("Devices") && page.contains("alice"), "{page}");
    assert!(head.to_ascii_lowercase().contains("x-frame-options: deny"));
    let port = addr.rsplit_once(':').unwrap().1;
    assert_eq!(
        get(&addr, &format!("localhost:{port}"), "/", Some(&token)).0,
        200
    );
    for host in [
        format!("evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
        "127.0.0.1".to_string(),
    ] {
        let (status, _, body) = get(&addr, &host, "/", Some(&token));
        assert_eq!(status, 421, "Host {host}: {body}");
    }

    // No page shows a key or the web secret.
    for secret in home_secrets(&home) {
        assert!(
            !page.contains(&secret),
            "the page shows a secret of the home"
        );
    }

    // A state change needs the page's CSRF token and no foreign origin.
    let csrf = csrf_of(&page);
    let form = |csrf: &str| format!("csrf={csrf}&role=device&minutes=10");
    assert!(post(&addr, "/invite", &token, "", &form("forged")).0 == 403);
    assert!(post(&addr, "/invite", &token, "", "role=device&minutes=10").0 >= 400);
    let foreign = "Origin: http://evil.example\r\n";
    assert_eq!(post(&addr, "/invite", &token, foreign, &form(&csrf)).0, 403);
    let cross = "Sec-Fetch-Site: cross-site\r\n";
    assert_eq!(post(&addr, "/invite", &token, cross, &form(&csrf)).0, 403);
    assert!(!get(&addr, &addr, "/", Some(&token))
        .2
        .contains(r#"id="invite-code""#));
    // The page's own form: an invite, shown with its QR code.
    let same = format!("Origin: http://{addr}\r\nSec-Fetch-Site: same-origin\r\n");
    assert_eq!(post(&addr, "/invite", &token, &same, &form(&csrf)).0, 303);
    let page = get(&addr, &addr, "/", Some(&token)).2;
    assert!(
        page.contains(r#"id="invite-code""#) && page.contains("<svg"),
        "{page}"
    );
}

#[test]
fn a_storage_peers_page_only_shows() {
    let root = tempfile::tempdir().unwrap();
    let home = root.path().join("s");
    meshsync_ok(&home, &["init", "--storage", "--name", "nas"]);
    let _s = Daemon::start_with_web(&home);
    let (addr, token) = web_link(&home);
    let (status, _, page) = get(&addr, &addr, "/", Some(&token));
    assert_eq!(status, 200);
    assert!(
        page.contains("Storage peer") && !page.contains("<form"),
        "{page}"
    );
    let same = format!("Origin: http://{addr}\r\n");
    let (status, _, body) = post(
        &addr,
        "/invite",
        &token,
        &same,
        "csrf=x&role=device&minutes=1",
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("only shows"), "{body}");
}
