//! Who gets in: a loopback `Host`, the home's secret (as a link's `token` once, then as a
//! cookie), and for anything that changes state the page's CSRF token and no foreign origin.
//! Every answer forbids framing and caching, and referrers to other sites (the link's secret
//! never leaks on).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

use super::Web;

/// The cookie that holds the secret once the link was opened.
pub const COOKIE: &str = "meshsync_web";

/// Checks every request before it reaches a route.
pub async fn guard(State(web): State<Arc<Web>>, request: Request, next: Next) -> Response {
    let response = match check(&web, &request) {
        Some(refused_or_redirect) => refused_or_redirect,
        None => next.run(request).await,
    };
    harden(response)
}

/// `None` to let the request through; else the answer instead (a refusal, or the link's
/// redirect that sets the cookie).
fn check(web: &Web, request: &Request) -> Option<Response> {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !is_our_host(host, web.port) {
        return Some(refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "This page answers only at its loopback address (127.0.0.1). Open the link \
             `meshsync web` prints.",
        ));
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        if web.read_only {
            return Some(refuse(
                StatusCode::FORBIDDEN,
                "A storage peer's page only shows: make changes from a device.",
            ));
        }
        if !same_origin(headers, host) {
            return Some(refuse(
                StatusCode::FORBIDDEN,
                "Refused: the request came from another site.",
            ));
        }
    }
    if has_secret_cookie(headers, &web.secret) {
        return None;
    }
    let token = request.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(str::to_string)
    });
    if request.method() == Method::GET && token.is_some_and(|t| equal(&t, &web.secret)) {
        let cookie = format!(
            "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age=31536000",
            web.secret
        );
        let mut redirect = Redirect::to("/").into_response();
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            redirect.headers_mut().insert(header::SET_COOKIE, value);
        }
        return Some(redirect);
    }
    Some(refuse(
        StatusCode::UNAUTHORIZED,
        "This is meshsync's page. Open the link that `meshsync web` prints on this machine.",
    ))
}

/// `127.0.0.1:PORT`, `localhost:PORT` or `[::1]:PORT`, and nothing else.
fn is_our_host(host: &str, port: u16) -> bool {
    let Some((name, p)) = host.rsplit_once(':') else {
        return false;
    };
    p.parse::<u16>() == Ok(port) && matches!(name, "127.0.0.1" | "localhost" | "[::1]")
}

/// The browser's own word on where a request comes from: `Origin` (if sent) must be this
/// page, and `Sec-Fetch-Site` (if sent) must say same-origin or none.
fn same_origin(headers: &HeaderMap, host: &str) -> bool {
    let origin_ok = match headers.get(header::ORIGIN).map(|o| o.to_str()) {
        None => true,
        Some(Ok(origin)) => origin == format!("http://{host}"),
        Some(Err(_)) => false,
    };
    let site_ok = match headers.get("sec-fetch-site").map(|s| s.to_str()) {
        None => true,
        Some(Ok(site)) => site == "same-origin" || site == "none",
        Some(Err(_)) => false,
    };
    origin_ok && site_ok
}

fn has_secret_cookie(headers: &HeaderMap, secret: &str) -> bool {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().strip_prefix(&format!("{COOKIE}=")))
        .any(|value| equal(value, secret))
}

/// Compares secrets in time that does not depend on where they differ.
pub fn equal(a: &str, b: &str) -> bool {
    blake3::hash(a.as_bytes()) == blake3::hash(b.as_bytes())
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        why.to_string(),
    )
        .into_response()
}

fn harden(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        // (`no-referrer` would make the browser send `Origin: null` with the page's own forms.)
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_on_our_port() {
        assert!(is_our_host("127.0.0.1:8385", 8385));
        assert!(is_our_host("localhost:8385", 8385));
        assert!(is_our_host("[::1]:8385", 8385));
        assert!(!is_our_host("127.0.0.1:8386", 8385));
        assert!(!is_our_host("evil.example:8385", 8385));
        assert!(!is_our_host("127.0.0.1.evil.example:8385", 8385));
        assert!(!is_our_host("127.0.0.1", 8385));
    }
}
