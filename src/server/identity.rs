//! Who is asking: an httpOnly cookie for browsers, `Authorization: Bearer` for programs; and
//! whether a WebSocket upgrade comes from an allowed origin; whether a scraper may read the
//! metrics.

use std::net::{IpAddr, SocketAddr};

use axum::http::header::{AUTHORIZATION, COOKIE, HOST, ORIGIN};
use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use super::AppState;
use crate::store::{StoreError, UserId};

pub const COOKIE_NAME: &str = "smolchat_token";

/// The token a request carries: a bearer token first, else the cookie (an `Authorization`
/// header of another scheme, as a proxy's basic auth, leaves the cookie to speak).
pub fn token(headers: &HeaderMap) -> Option<String> {
    bearer(headers).or_else(|| {
        headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == COOKIE_NAME)
            .map(|(_, v)| v.to_owned())
    })
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned())
}

/// Whether the request may read `/metrics`: anyone when the server has no metrics token, else
/// only a bearer of it (compared as digests, so the time taken says nothing about the token).
pub fn metrics_allowed(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(want) = &state.metrics_token else {
        return true;
    };
    bearer(headers).is_some_and(|given| Sha256::digest(given) == Sha256::digest(want))
}

/// The user behind the request's token: `None` when it carries none or one nobody holds. A
/// failed look-up is an error, not "nobody" (which would hand out a new identity).
pub async fn user(state: &AppState, headers: &HeaderMap) -> Result<Option<UserId>, StoreError> {
    match token(headers) {
        Some(t) => state.store.user_for_token(&t).await,
        None => Ok(None),
    }
}

/// The user, or a new visitor with the `Set-Cookie` value that identifies them (the visitor is
/// stored only once they store something).
pub async fn user_or_new(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(UserId, Option<String>), StoreError> {
    if let Some(u) = user(state, headers).await? {
        return Ok((u, None));
    }
    let (u, t) = state.store.new_visitor();
    Ok((u, Some(cookie(&t))))
}

/// The `Set-Cookie` value that makes `token` this browser's.
pub fn cookie(token: &str) -> String {
    format!("{COOKIE_NAME}={token}; HttpOnly; SameSite=Lax; Path=/; Max-Age=31536000")
}

/// Browsers send `Origin` on a WebSocket upgrade: it must be this server's own (same host) or
/// in the allow-list. Programs that send none are identified by their token alone.
pub fn origin_allowed(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    if state.allowed_origins.iter().any(|o| o == origin) {
        return true;
    }
    let Some(host) = headers.get(HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    origin == format!("http://{host}") || origin == format!("https://{host}")
}

/// The client's address: the peer's, or behind a trusted reverse proxy the last
/// `X-Forwarded-For` entry (the one the proxy appended; earlier ones are the client's to
/// write). A header that does not parse leaves the peer's.
pub fn client_address(state: &AppState, headers: &HeaderMap, peer: SocketAddr) -> IpAddr {
    let forwarded = || {
        let last = headers.get_all("x-forwarded-for").iter().next_back()?;
        let entry = last.to_str().ok()?.rsplit(',').next()?.trim();
        entry
            .parse::<IpAddr>()
            .ok()
            .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
    };
    state
        .trust_forwarded_for
        .then(forwarded)
        .flatten()
        .unwrap_or(peer.ip())
}
