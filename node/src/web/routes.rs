//! The page's routes: the page, its live part (as HTML and as server-sent events), its script
//! and style, and the four actions (each a form POST carrying the CSRF token, answered with a
//! redirect back to the page and a notice of what happened).

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use futures::Stream;
use serde::Deserialize;

use super::page::{self, ShownInvite, View};
use super::{guard, Web};
use crate::control::{
    ConflictCopy, DeviceInfo, InviteCode, KeptFile, Request, Resolved, Restored, Status,
    VersionList,
};

pub fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/live", get(live))
        .route("/events", get(events))
        .route("/app.js", get(script))
        .route("/style.css", get(style))
        .route("/invite", post(invite))
        .route("/resolve", post(resolve))
        .route("/allow-deletes", post(allow_deletes))
        .route("/restore", post(restore))
        .layer(axum::middleware::from_fn_with_state(
            web.clone(),
            guard::guard,
        ))
        .with_state(web)
}

async fn index(State(web): State<Arc<Web>>) -> Html<String> {
    let view = gather(&web).await;
    Html(page::page(&view, &web.csrf, web.read_only))
}

async fn live(State(web): State<Arc<Web>>) -> Html<String> {
    let view = gather(&web).await;
    Html(page::live(&view, &web.csrf, web.read_only))
}

/// The live part, re-rendered every second.
async fn events(State(web): State<Arc<Web>>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = futures::stream::unfold(web, |web| async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let view = gather(&web).await;
        let html = page::live(&view, &web.csrf, web.read_only);
        Some((Ok(Event::default().event("live").data(html)), web))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("app.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("style.css"),
    )
        .into_response()
}

/// Everything the page shows, asked of the daemon as the CLI would.
async fn gather(web: &Web) -> View {
    let status = web.ask::<Status>(Request::Status).await;
    if let Ok(status) = &status {
        web.rates.add(status);
    }
    let devices: Vec<DeviceInfo> = web.ask(Request::Devices).await.unwrap_or_default();
    let device = matches!(status, Ok(Status::Device(_)));
    let (conflicts, kept) = if device {
        let conflicts: Vec<ConflictCopy> = web.ask(Request::Conflicts).await.unwrap_or_default();
        let files: Vec<KeptFile> = web.ask(Request::KeptFiles).await.unwrap_or_default();
        let mut kept = Vec::new();
        for file in files {
            let path = PathBuf::from(&file.absolute);
            if let Ok(list) = web.ask::<VersionList>(Request::Versions { path }).await {
                kept.push((file, list));
            }
        }
        (conflicts, kept)
    } else {
        (Vec::new(), Vec::new())
    };
    let members: BTreeSet<String> = devices.iter().map(|d| d.id.clone()).collect();
    let invite = {
        let mut shown = web.invite.lock().expect("invite lock");
        if shown.as_ref().is_some_and(|i| i.spent(&members)) {
            *shown = None;
        }
        shown.clone()
    };
    let peer_rates = devices
        .iter()
        .map(|d| (d.id.clone(), web.rates.peer(&d.id)))
        .collect();
    let folder_rates = match &status {
        Ok(Status::Device(d)) => d
            .folders
            .iter()
            .map(|f| {
                let progress = web.rates.progress(&f.id);
                (f.id.clone(), (web.rates.folder(&f.id), progress))
            })
            .collect(),
        _ => Default::default(),
    };
    View {
        status: status.map_err(|e| format!("{e:#}")),
        devices,
        conflicts,
        kept,
        invite,
        notice: web.notice(),
        peer_rates,
        folder_rates,
    }
}

/// The refusal of a form without the page's CSRF token, if it is one.
fn check_csrf(web: &Web, token: &str) -> Option<Response> {
    if guard::equal(token, &web.csrf) {
        None
    } else {
        Some((
            StatusCode::FORBIDDEN,
            "Refused: this form did not come from meshsync's page (reload the page and try again).",
        )
            .into_response())
    }
}

#[derive(Deserialize)]
struct InviteForm {
    csrf: String,
    role: String,
    minutes: u64,
}

async fn invite(State(web): State<Arc<Web>>, Form(form): Form<InviteForm>) -> Response {
    if let Some(refused) = check_csrf(&web, &form.csrf) {
        return refused;
    }
    let members: Vec<DeviceInfo> = web.ask(Request::Devices).await.unwrap_or_default();
    let expires_secs = form.minutes.clamp(1, 7 * 24 * 60) * 60;
    let request = Request::Invite {
        role: form.role.clone(),
        expires_secs,
    };
    match web.ask::<InviteCode>(request).await {
        Ok(InviteCode { code }) => {
            *web.invite.lock().expect("invite lock") = Some(ShownInvite {
                code,
                role: form.role,
                expires_at: crate::versions::now_secs() + expires_secs,
                members_before: members.into_iter().map(|d| d.id).collect(),
            });
        }
        Err(error) => web.notify(format!("No invite: {error:#}")),
    }
    Redirect::to("/").into_response()
}

#[derive(Deserialize)]
struct ResolveForm {
    csrf: String,
    folder: String,
    copy: String,
    keep: String,
}

async fn resolve(State(web): State<Arc<Web>>, Form(form): Form<ResolveForm>) -> Response {
    if let Some(refused) = check_csrf(&web, &form.csrf) {
        return refused;
    }
    let request = Request::Resolve {
        folder: form.folder,
        copy: form.copy,
        keep_copy: form.keep == "copy",
    };
    match web.ask::<Resolved>(request).await {
        Ok(r) => web.notify(format!(
            "Kept the {} at {}; the other version stays restorable under Old versions.",
            if r.kept == "copy" {
                "conflict copy's content"
            } else {
                "original"
            },
            r.path
        )),
        Err(error) => web.notify(format!("Not resolved: {error:#}")),
    }
    Redirect::to("/").into_response()
}

#[derive(Deserialize)]
struct FolderForm {
    csrf: String,
    folder: String,
}

async fn allow_deletes(State(web): State<Arc<Web>>, Form(form): Form<FolderForm>) -> Response {
    if let Some(refused) = check_csrf(&web, &form.csrf) {
        return refused;
    }
    let request = Request::Scan {
        folder: Some(form.folder),
        allow_deletes: true,
    };
    match web.ask::<serde_json::Value>(request).await {
        Ok(_) => web.notify("The held deletions went ahead."),
        Err(error) => web.notify(format!("Deletions still held: {error:#}")),
    }
    Redirect::to("/").into_response()
}

#[derive(Deserialize)]
struct RestoreForm {
    csrf: String,
    path: String,
    number: usize,
}

async fn restore(State(web): State<Arc<Web>>, Form(form): Form<RestoreForm>) -> Response {
    if let Some(refused) = check_csrf(&web, &form.csrf) {
        return refused;
    }
    let request = Request::Restore {
        path: PathBuf::from(&form.path),
        version: Some(form.number),
    };
    match web.ask::<Restored>(request).await {
        Ok(r) => web.notify(format!(
            "Restored version {} of {} ({} bytes); the version it replaced is kept.",
            r.number, r.path, r.size
        )),
        Err(error) => web.notify(format!("Not restored: {error:#}")),
    }
    Redirect::to("/").into_response()
}
