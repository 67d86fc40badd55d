//! The page, the REST API for scripts and first paint, health and metrics.

// Handlers return a ready `Response` as their error, the axum way; its size does not matter here.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE, SET_COOKIE, WWW_AUTHENTICATE,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ractor::call;
use serde::Deserialize;
use serde_json::json;

use super::{export, identity, AppState, NewConversation, NotCreated};
use crate::store::{
    Conversation, ConversationId, ConversationPatch, ListCursor, Message, Redeemer, StoreError,
    UserId, LINK_CODE_TTL_MS,
};

const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");
/// Pinned npm packages, vendored: marked 18.2.1 (markdown) and DOMPurify 3.4.18 (sanitizer).
const MARKED_JS: &str = include_str!("../../web/vendor/marked.esm.js");
const PURIFY_JS: &str = include_str!("../../web/vendor/purify.es.mjs");

/// A JSON error with a stable code.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response {
    metrics::counter!("smolchat_errors_total", "code" => code.to_owned()).increment(1);
    (status, Json(json!({ "code": code, "message": message }))).into_response()
}

pub(super) fn store_error(e: StoreError) -> Response {
    let code = e.code();
    match e {
        StoreError::NotFound => error(StatusCode::NOT_FOUND, code, "conversation not found"),
        StoreError::Invalid(m) => error(StatusCode::BAD_REQUEST, code, &m),
        StoreError::TooManyConversations(_)
        | StoreError::Busy
        | StoreError::WouldHide(_)
        | StoreError::TooManyLogins(_) => error(StatusCode::CONFLICT, code, &e.to_string()),
        StoreError::BadLinkCode => error(StatusCode::BAD_REQUEST, code, &e.to_string()),
        StoreError::SignedOut => error(StatusCode::UNAUTHORIZED, code, &e.to_string()),
        StoreError::Db(e) => {
            tracing::error!(error = %e, "storage error");
            error(StatusCode::INTERNAL_SERVER_ERROR, code, "storage error")
        }
    }
}

async fn require_user(state: &AppState, headers: &HeaderMap) -> Result<UserId, Response> {
    identity::user(state, headers)
        .await
        .map_err(store_error)?
        .ok_or_else(|| {
            error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "no valid token: open the page or send Authorization: Bearer",
            )
        })
}

/// The caller of a request that changes something: as [`require_user`], and a browser's
/// `Origin` must be one the socket would accept (a page of another origin, even another port
/// of this host, which SameSite counts as the same site, cannot use the visitor's cookie).
async fn require_writer(state: &AppState, headers: &HeaderMap) -> Result<UserId, Response> {
    if !identity::origin_allowed(state, headers) {
        return Err(error(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "this origin may not change conversations",
        ));
    }
    require_user(state, headers).await
}

/// The caller and the conversation id of the path, or the response that refuses them.
async fn user_and_id(
    state: &AppState,
    headers: &HeaderMap,
    id: &Result<Path<String>, PathRejection>,
) -> Result<(UserId, ConversationId), Response> {
    Ok((require_user(state, headers).await?, parse_id(id)?))
}

/// [`user_and_id`] for a request that changes the conversation.
async fn writer_and_id(
    state: &AppState,
    headers: &HeaderMap,
    id: &Result<Path<String>, PathRejection>,
) -> Result<(UserId, ConversationId), Response> {
    Ok((require_writer(state, headers).await?, parse_id(id)?))
}

fn parse_id(id: &Result<Path<String>, PathRejection>) -> Result<ConversationId, Response> {
    // An id that is not a UUID (or not even text) answers like a conversation that does not
    // exist.
    id.as_ref()
        .ok()
        .and_then(|Path(id)| id.parse().ok())
        .ok_or_else(|| error(StatusCode::NOT_FOUND, "not_found", "conversation not found"))
}

pub async fn index(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    match identity::user_or_new(&state, &headers).await {
        Ok((_, cookie)) => {
            let mut r = (
                [
                    (CONTENT_TYPE, "text/html; charset=utf-8"),
                    (CACHE_CONTROL, "no-cache"),
                ],
                INDEX_HTML,
            )
                .into_response();
            if let Some(c) = cookie.and_then(|c| c.parse().ok()) {
                r.headers_mut().insert(SET_COOKIE, c);
            }
            r
        }
        Err(e) => store_error(e),
    }
}

pub async fn app_js() -> Response {
    (
        [
            (CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
        ],
        APP_JS,
    )
        .into_response()
}

pub async fn marked_js() -> Response {
    (
        [(CONTENT_TYPE, "text/javascript; charset=utf-8")],
        MARKED_JS,
    )
        .into_response()
}

pub async fn purify_js() -> Response {
    (
        [(CONTENT_TYPE, "text/javascript; charset=utf-8")],
        PURIFY_JS,
    )
        .into_response()
}

pub async fn style_css() -> Response {
    (
        [
            (CONTENT_TYPE, "text/css; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
        ],
        STYLE_CSS,
    )
        .into_response()
}

#[derive(Deserialize)]
pub struct ListQuery {
    /// Search one's messages for these words (and ignore the rest).
    q: Option<String>,
    /// Conversations per page.
    limit: Option<usize>,
    /// The `next` of the page before.
    after: Option<String>,
}

/// Conversations per page unless `limit` says otherwise.
const PAGE: usize = 100;
/// The most `limit` may say (more where a user may keep more conversations).
const MAX_PAGE: usize = 5_000;

pub async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let user = match require_user(&state, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let bad = |m: &str| error(StatusCode::BAD_REQUEST, "invalid_request", m);
    let Ok(Query(query)) = query else {
        return bad("the query string takes `q=<words>`, or `limit=<n>` and `after=<next>`");
    };
    if let Some(q) = query.q.filter(|q| !q.trim().is_empty()) {
        return match state.store.search(user, &q).await {
            Ok(hits) => Json(json!({ "results": hits })).into_response(),
            Err(e) => store_error(e),
        };
    }
    let limit = query.limit.unwrap_or(PAGE);
    let most = MAX_PAGE.max(state.limits.conversations_per_user);
    if !(1..=most).contains(&limit) {
        return bad(&format!("`limit` is from 1 to {most}"));
    }
    let after = match query.after.as_deref().map(str::parse::<ListCursor>) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => return bad(&e.to_string()),
    };
    // One more than asked says whether there is a next page.
    match state.store.conversations_page(user, after, limit + 1).await {
        Ok(mut list) => {
            let more = list.len() > limit;
            list.truncate(limit);
            let next = list.last().filter(|_| more).map(ListCursor::after);
            Json(json!({ "conversations": list, "next": next.map(|c| c.to_string()) }))
                .into_response()
        }
        Err(e) => store_error(e),
    }
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let user = match require_writer(&state, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let new: NewConversation = if body.is_empty() {
        NewConversation::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(n) => n,
            Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string()),
        }
    };
    let token = identity::token(&headers);
    let client = identity::client_address(&state, &headers, peer);
    match super::create_conversation(&state, token.as_deref(), user, client, &new).await {
        Ok(c) => (StatusCode::CREATED, Json(c)).into_response(),
        Err(NotCreated::Store(e)) => store_error(e),
        Err(e) => error(StatusCode::TOO_MANY_REQUESTS, e.code(), &e.to_string()),
    }
}

/// The caller's conversation of the path and its shown branch.
async fn shown(
    state: &AppState,
    headers: &HeaderMap,
    id: &Result<Path<String>, PathRejection>,
) -> Result<(Conversation, Vec<Message>), Response> {
    let (user, id) = user_and_id(state, headers, id).await?;
    let conversation = state
        .store
        .conversation(user, id)
        .await
        .map_err(store_error)?;
    let messages = state
        .store
        .branch(user, id, None)
        .await
        .map_err(store_error)?;
    Ok((conversation, messages))
}

pub async fn get_one(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    match shown(&state, &headers, &id).await {
        Ok((conversation, messages)) => {
            Json(json!({ "conversation": conversation, "messages": messages })).into_response()
        }
        Err(r) => r,
    }
}

/// The shown branch as a Markdown file to download.
pub async fn export(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    match shown(&state, &headers, &id).await {
        Ok((conversation, messages)) => (
            [
                (CONTENT_TYPE, "text/markdown; charset=utf-8".to_owned()),
                (
                    CONTENT_DISPOSITION,
                    export::content_disposition(&conversation.title),
                ),
                (CACHE_CONTROL, "no-store".to_owned()),
            ],
            export::markdown(&conversation, &messages),
        )
            .into_response(),
        Err(r) => r,
    }
}

pub async fn patch(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Response {
    let (user, id) = match writer_and_id(&state, &headers, &id).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let patch: ConversationPatch = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string()),
    };
    match state.store.update_conversation(user, id, &patch).await {
        Ok(c) => Json(c).into_response(),
        Err(e) => store_error(e),
    }
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let (user, id) = match writer_and_id(&state, &headers, &id).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    match super::ws::delete_conversation(&state, user, id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => store_error(e),
    }
}

/// A one-time link code that signs another browser in as the caller (ten minutes).
pub async fn create_link(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let user = match require_writer(&state, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    match state.store.create_link_code(user).await {
        Ok(code) => (
            StatusCode::CREATED,
            [(CACHE_CONTROL, "no-store")],
            Json(json!({ "code": code, "expires_in_s": LINK_CODE_TTL_MS / 1000 })),
        )
            .into_response(),
        Err(StoreError::NotFound) => error(
            StatusCode::CONFLICT,
            "nothing_to_link",
            "start a conversation first: there is nothing to take to another device yet",
        ),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Redeem {
    code: String,
    /// Bring this browser's own conversations along (else they would be hidden: refused).
    #[serde(default)]
    merge: bool,
}

/// Signs this browser in with a link code: a login of its own as the code's user.
pub async fn redeem_link(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !identity::origin_allowed(&state, &headers) {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "this origin may not sign a browser in",
        );
    }
    let redeem: Redeem = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string()),
    };
    let current = match identity::user(&state, &headers).await {
        Ok(u) => u,
        Err(e) => return store_error(e),
    };
    let token = identity::token(&headers);
    let by = current
        .zip(token.as_deref())
        .map(|(user, token)| Redeemer { user, token });
    // Once the code is checked, no answer of the caller's starts until the move is stored
    // (or refused).
    match state
        .store
        .redeem_link_code_holding(redeem.code.trim(), by, redeem.merge, |user| {
            state.begin_move(user)
        })
        .await
    {
        Ok((user, token)) => {
            let was = current.filter(|c| *c != user);
            tracing::info!(%user, ?was, merge = redeem.merge, "a browser signed in with a link");
            if let Some(was) = was {
                // Its other tabs hold the old login, gone now.
                let _ = state
                    .identity_changes
                    .send((was, "this browser signed in with a link"));
            }
            let mut r = Json(json!({ "user_id": user })).into_response();
            if let Ok(c) = identity::cookie(&token).parse() {
                r.headers_mut().insert(SET_COOKIE, c);
            }
            r
        }
        Err(e) => store_error(e),
    }
}

/// Signs the caller's other browsers and programs out (their sockets close with 4401).
pub async fn sign_out_others(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let user = match require_writer(&state, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let token = identity::token(&headers).unwrap_or_default();
    match state.store.sign_out_others(user, &token).await {
        Ok(n) => {
            tracing::info!(%user, logins = n, "signed out elsewhere");
            let _ = state
                .identity_changes
                .send((user, "signed out from another device"));
            Json(json!({ "signed_out": n })).into_response()
        }
        Err(e) => store_error(e),
    }
}

pub async fn healthz() -> &'static str {
    "ok"
}

pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match call!(state.model, crate::actors::ModelMsg::Status) {
        Ok(s) if s.waiting < s.max_queue => {
            Json(json!({ "ready": true, "running": s.running, "waiting": s.waiting }))
                .into_response()
        }
        Ok(s) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": "queue full", "waiting": s.waiting })),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": "model actor unavailable" })),
        )
            .into_response(),
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if !identity::metrics_allowed(&state, &headers) {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this server's metrics need Authorization: Bearer with its metrics token",
        );
        r.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
