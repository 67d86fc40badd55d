//! Who is asking: an httpOnly cookie for browsers, `Authorization: Bearer` for programs; and
//! whether a WebSocket upgrade comes from an allowed origin.

use axum::http::header::{AUTHORIZATION, COOKIE, HOST, ORIGIN};
use axum::http::HeaderMap;

use super::AppState;
use crate::store::{StoreError, UserId};

pub const COOKIE_NAME: &str = "smolchat_token";

/// The token a request carries: a bearer token first, else the cookie (an `Authorization`
/// header of another scheme, as a proxy's basic auth, leaves the cookie to speak).
pub fn token(headers: &HeaderMap) -> Option<String> {
    let bearer = headers
        .get_all(AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    bearer.or_else(|| {
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
    let cookie = format!("{COOKIE_NAME}={t}; HttpOnly; SameSite=Lax; Path=/; Max-Age=31536000");
    Ok((u, Some(cookie)))
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
