//! The WebSocket: one task per socket. A writer task sends frames from a bounded queue; the
//! reader parses each frame into a [`ClientMessage`], hands it to the conversation's session
//! actor, and answers errors in place. Every open conversation is a subscription whose events
//! are forwarded to the writer.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use ractor::{call, ActorRef, RpcReplyPort};
use tokio::sync::{broadcast, mpsc};

use super::rest::{error, store_error};
use super::{create_conversation, identity, lock, AppState, NewConversation, NotCreated};
use crate::actors::registry::RegistryMsg;
use crate::actors::session::{SessionError, SessionMsg, SubscriberId};
use crate::protocol::{ClientMessage, ServerEvent, PROTOCOL_VERSION};
use crate::store::{ConversationId, StoreError, UserId};

/// Frames queued for one socket; a client that reads slower than this is cut off.
const OUTBOX: usize = 1024;
/// Events queued per subscription inside the session actor.
const SUBSCRIPTION: usize = 512;

enum Outgoing {
    Event(Box<ServerEvent>),
    Close(u16, &'static str),
}

/// An error answered in place: (code, message).
type Refusal = (&'static str, String);

fn refusal(e: SessionError) -> Refusal {
    (e.code(), e.to_string())
}

/// A store error as the socket tells it: `signed_out` as such (the socket then closes), the
/// rest as the sessions name them.
fn store_refusal(e: StoreError) -> Refusal {
    match e {
        StoreError::SignedOut => (e.code(), e.to_string()),
        e => refusal(e.into()),
    }
}

pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !identity::origin_allowed(&state, &headers) {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "this origin may not open the socket",
        );
    }
    // Before the token is looked up: a sign-out between the two still reaches the socket.
    let identity_changes = state.identity_changes.subscribe();
    let user = match identity::user(&state, &headers).await {
        Ok(Some(user)) => user,
        Ok(None) => {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "no valid token: open the page or send Authorization: Bearer",
            )
        }
        Err(e) => return store_error(e),
    };
    let Some(slot) = SocketSlot::take(&state, user) else {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_sockets",
            "too many open sockets for this user",
        );
    };
    let limit = state.limits.max_frame_bytes;
    let token = identity::token(&headers);
    let address = identity::client_address(&state, &headers, peer);
    ws.max_frame_size(limit)
        .max_message_size(limit)
        .on_upgrade(move |socket| async move {
            metrics::gauge!("smolchat_ws_connections").increment(1.0);
            run(
                state.clone(),
                user,
                token,
                address,
                identity_changes,
                socket,
            )
            .await;
            metrics::gauge!("smolchat_ws_connections").decrement(1.0);
            drop(slot);
        })
        .into_response()
}

/// One of a user's sockets, counted against `sockets_per_user` for as long as it lives. It is
/// given back when dropped, so also when the upgrade fails (its callback is then dropped
/// unrun) or the socket's task unwinds.
struct SocketSlot {
    state: Arc<AppState>,
    user: UserId,
}

impl SocketSlot {
    fn take(state: &Arc<AppState>, user: UserId) -> Option<Self> {
        let mut sockets = lock(&state.sockets);
        let n = sockets.entry(user).or_default();
        if *n >= state.limits.sockets_per_user {
            return None;
        }
        *n += 1;
        Some(Self {
            state: state.clone(),
            user,
        })
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        let mut sockets = lock(&self.state.sockets);
        if let Some(n) = sockets.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                sockets.remove(&self.user);
            }
        }
    }
}

struct Socket {
    state: Arc<AppState>,
    user: UserId,
    /// The token the socket was opened with (a visitor's is stored with their first
    /// conversation).
    token: Option<String>,
    /// Where the socket came from (new users are counted per address).
    address: IpAddr,
    out: mpsc::Sender<Outgoing>,
    subscriptions: HashMap<
        ConversationId,
        (
            ActorRef<SessionMsg>,
            SubscriberId,
            tokio::task::JoinHandle<()>,
        ),
    >,
}

/// Serves one socket; `identity_changes` was subscribed to before its user was looked up.
async fn run(
    state: Arc<AppState>,
    user: UserId,
    token: Option<String>,
    address: IpAddr,
    mut identity_changes: broadcast::Receiver<(UserId, &'static str)>,
    socket: WebSocket,
) {
    let (mut sink, mut stream) = socket.split();
    let (out, mut outbox) = mpsc::channel::<Outgoing>(OUTBOX);
    let write_timeout = state.limits.write_timeout;
    let writer = tokio::spawn(async move {
        while let Some(o) = outbox.recv().await {
            let frame = match o {
                Outgoing::Event(ev) => match serde_json::to_string(&*ev) {
                    Ok(s) => Message::Text(s.into()),
                    Err(_) => continue,
                },
                Outgoing::Close(code, reason) => {
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code,
                            reason: reason.into(),
                        })))
                        .await;
                    break;
                }
            };
            match tokio::time::timeout(write_timeout, sink.send(frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    tracing::info!("a client stopped reading its socket; dropping it");
                    break;
                }
            }
        }
    });
    let mut s = Socket {
        state: state.clone(),
        user,
        token,
        address,
        out,
        subscriptions: HashMap::new(),
    };
    s.send(ServerEvent::Hello {
        protocol: PROTOCOL_VERSION,
        user_id: user.to_string(),
    })
    .await;
    let mut shutdown = state.shutdown.clone();
    let mut bad_frames = 0usize;
    loop {
        let frame = tokio::select! {
            f = stream.next() => f,
            _ = shutdown.changed() => {
                s.close(1001, "server shutting down").await;
                break;
            }
            changed = identity_changes.recv() => {
                let why = match changed {
                    Ok((u, why)) if u == s.user => Some(why),
                    Ok(_) | Err(broadcast::error::RecvError::Closed) => None,
                    Err(broadcast::error::RecvError::Lagged(_)) => Some("signed out"),
                };
                if let Some(why) = why {
                    if s.signed_out().await {
                        s.close(4401, why).await;
                        break;
                    }
                }
                continue;
            }
            // The writer gave up on this client (or the socket broke): nothing can reach it.
            _ = s.out.closed() => break,
        };
        let text = match frame {
            None | Some(Ok(Message::Close(_))) => break,
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                bad_frames += 1;
                s.send(ServerEvent::error(
                    "binary_not_supported",
                    "frames must be JSON text",
                    None,
                ))
                .await;
                if bad_frames >= state.limits.max_bad_frames {
                    s.close(1008, "too many bad frames").await;
                    break;
                }
                continue;
            }
            Some(Ok(_)) => continue, // ping and pong
            Some(Err(e)) => {
                // Oversized frames and invalid UTF-8 end the socket; nothing reaches the store.
                let text = e.to_string().to_lowercase();
                let too_big = ["size", "too long", "capacity", "limit"]
                    .iter()
                    .any(|w| text.contains(w));
                tracing::debug!(error = %e, "socket error");
                if too_big {
                    s.close(1009, "frame too large").await;
                } else {
                    s.close(1007, "invalid frame").await;
                }
                break;
            }
        };
        metrics::counter!("smolchat_ws_messages_total").increment(1);
        match serde_json::from_str::<ClientMessage>(&text) {
            Ok(msg) => {
                let rid = msg.request_id().map(str::to_owned);
                if let Err((code, message)) = s.handle(msg).await {
                    metrics::counter!("smolchat_errors_total", "code" => code).increment(1);
                    s.send(ServerEvent::error(code, message, rid.as_deref()))
                        .await;
                    if code == StoreError::SignedOut.code() {
                        s.close(4401, "signed out").await;
                        break;
                    }
                }
            }
            Err(e) => {
                bad_frames += 1;
                let msg = e.to_string();
                let code = if msg.contains("unknown variant") {
                    "unknown_type"
                } else if e.is_syntax() || e.is_eof() {
                    "invalid_json"
                } else {
                    "invalid_message"
                };
                metrics::counter!("smolchat_errors_total", "code" => code).increment(1);
                let rid = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| {
                        v.get("request_id")
                            .and_then(|r| r.as_str())
                            .map(str::to_owned)
                    });
                s.send(ServerEvent::error(code, msg, rid.as_deref())).await;
                if bad_frames >= state.limits.max_bad_frames {
                    s.close(1008, "too many bad frames").await;
                    break;
                }
            }
        }
    }
    for (_, (session, sub, task)) in s.subscriptions.drain() {
        let _ = session.cast(SessionMsg::Unsubscribe(sub));
        task.abort();
    }
    drop(s);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

impl Socket {
    async fn send(&self, ev: ServerEvent) {
        let _ = self.out.send(Outgoing::Event(Box::new(ev))).await;
    }

    /// Whether the socket's token no longer names its user (a failed look-up is not taken
    /// for a sign-out).
    async fn signed_out(&self) -> bool {
        match &self.token {
            Some(t) => match self.state.store.user_for_token(t).await {
                Ok(now) => now != Some(self.user),
                Err(_) => false,
            },
            None => false,
        }
    }

    async fn close(&self, code: u16, reason: &'static str) {
        let _ = self.out.send(Outgoing::Close(code, reason)).await;
    }

    async fn session(&self, conv: ConversationId) -> Result<ActorRef<SessionMsg>, Refusal> {
        match call!(self.state.registry, RegistryMsg::Open, self.user, conv) {
            Ok(r) => r.map_err(refusal),
            Err(e) => Err(("internal_error", format!("registry: {e}"))),
        }
    }

    async fn handle(&mut self, msg: ClientMessage) -> Result<(), Refusal> {
        let st = self.state.clone();
        match msg {
            ClientMessage::Create {
                request_id,
                title,
                system_prompt,
                settings,
                reasoning,
            } => {
                let new = NewConversation {
                    title: title.unwrap_or_default(),
                    system_prompt: system_prompt.unwrap_or_default(),
                    settings: settings.unwrap_or_default(),
                    reasoning: reasoning.unwrap_or(false),
                };
                let token = self.token.as_deref();
                let c = create_conversation(&st, token, self.user, self.address, &new)
                    .await
                    .map_err(|e| match e {
                        NotCreated::Store(e) => store_refusal(e),
                        e => (e.code(), e.to_string()),
                    })?;
                self.send(ServerEvent::ConversationCreated {
                    request_id,
                    conversation: c,
                })
                .await;
            }
            ClientMessage::Open {
                conversation_id, ..
            } => self.open(conversation_id).await?,
            ClientMessage::Close {
                request_id,
                conversation_id,
            } => {
                if let Some((session, sub, task)) = self.subscriptions.remove(&conversation_id) {
                    let _ = session.cast(SessionMsg::Unsubscribe(sub));
                    task.abort();
                }
                self.send(ServerEvent::Ack { request_id }).await;
            }
            ClientMessage::Send {
                request_id,
                conversation_id,
                content,
            } => {
                self.check_content(&content)?;
                self.generate(conversation_id, |r| SessionMsg::Send(content, r))
                    .await?;
                self.send(ServerEvent::Ack { request_id }).await;
            }
            ClientMessage::Stop {
                request_id,
                conversation_id,
            } => {
                let session = self.session(conversation_id).await?;
                call!(session, SessionMsg::Stop).map_err(internal)?;
                self.send(ServerEvent::Ack { request_id }).await;
            }
            ClientMessage::Regenerate {
                request_id,
                conversation_id,
                message_id,
            } => {
                self.generate(conversation_id, |r| SessionMsg::Regenerate(message_id, r))
                    .await?;
                self.send(ServerEvent::Ack { request_id }).await;
            }
            ClientMessage::Edit {
                request_id,
                conversation_id,
                message_id,
                content,
            } => {
                self.check_content(&content)?;
                self.generate(conversation_id, |r| {
                    SessionMsg::Edit(message_id, content, r)
                })
                .await?;
                self.send(ServerEvent::Ack { request_id }).await;
            }
            ClientMessage::Rename {
                conversation_id,
                title,
                ..
            } => {
                let patch = crate::store::ConversationPatch {
                    title: Some(title),
                    ..Default::default()
                };
                let c = st
                    .store
                    .update_conversation(self.user, conversation_id, &patch)
                    .await
                    .map_err(store_refusal)?;
                self.send(ServerEvent::Renamed { conversation: c }).await;
            }
            ClientMessage::SelectBranch {
                conversation_id,
                message_id,
                ..
            } => {
                let session = self.session(conversation_id).await?;
                call!(session, SessionMsg::SelectBranch, message_id)
                    .map_err(internal)?
                    .map_err(refusal)?;
                self.open(conversation_id).await?;
            }
            ClientMessage::Delete {
                conversation_id, ..
            } => {
                delete_conversation(&st, self.user, conversation_id)
                    .await
                    .map_err(store_refusal)?;
                if let Some((_, _, task)) = self.subscriptions.remove(&conversation_id) {
                    task.abort();
                }
                self.send(ServerEvent::Deleted { conversation_id }).await;
            }
        }
        Ok(())
    }

    async fn open(&mut self, conv: ConversationId) -> Result<(), Refusal> {
        if let Some((session, sub, task)) = self.subscriptions.remove(&conv) {
            let _ = session.cast(SessionMsg::Unsubscribe(sub));
            task.abort();
        }
        let limit = self.state.limits.subscriptions_per_socket;
        if self.subscriptions.len() >= limit {
            return Err((
                "too_many_subscriptions",
                format!("this socket follows {limit} conversations already; close one first"),
            ));
        }
        let session = self.session(conv).await?;
        let (tx, mut rx) = mpsc::channel(SUBSCRIPTION);
        let (sub, snap) = call!(session, SessionMsg::Subscribe, tx)
            .map_err(internal)?
            .map_err(refusal)?;
        self.send(ServerEvent::Snapshot {
            conversation: snap.conversation,
            messages: snap.messages,
            streaming: snap.streaming,
            siblings: snap.siblings,
        })
        .await;
        let out = self.out.clone();
        let task = tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                if out
                    .send(Outgoing::Event(Box::new(ServerEvent::from_session(
                        conv, ev,
                    ))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            // The session let go of us (we fell behind, or it stopped): the client reopens.
            let ev = ServerEvent::Error {
                code: "subscription_ended".into(),
                message: "live updates stopped; open the conversation again".into(),
                request_id: None,
                conversation_id: Some(conv),
            };
            let _ = out.send(Outgoing::Event(Box::new(ev))).await;
        });
        self.subscriptions.insert(conv, (session, sub, task));
        Ok(())
    }

    fn check_content(&self, content: &str) -> Result<(), Refusal> {
        let n = content.chars().count();
        if n > self.state.limits.max_message_chars {
            return Err((
                "message_too_long",
                format!(
                    "the message has {n} characters; at most {} are allowed",
                    self.state.limits.max_message_chars
                ),
            ));
        }
        if content.contains('\0') {
            return Err((
                "invalid_request",
                "the message contains a NUL character".into(),
            ));
        }
        Ok(())
    }

    /// Starts an answer in `conv` with the session request `msg` builds, within the user's
    /// limits ([`Self::admit_generation`]); the reservation it took is settled by the answer.
    async fn generate(
        &self,
        conv: ConversationId,
        msg: impl FnOnce(RpcReplyPort<Result<(), SessionError>>) -> SessionMsg,
    ) -> Result<(), Refusal> {
        self.admit_generation(conv).await?;
        let started = match self.session(conv).await {
            Ok(session) => call!(session, msg)
                .map_err(internal)
                .and_then(|r| r.map_err(refusal)),
            Err(e) => Err(e),
        };
        let mut generating = lock(&self.state.generating);
        let set = generating.entry(self.user).or_default();
        let g = set.entry(conv).or_default();
        g.pending = g.pending.saturating_sub(1);
        g.started |= started.is_ok();
        if !g.started && g.pending == 0 {
            set.remove(&conv); // refused, and not generating before either
        }
        if set.is_empty() {
            generating.remove(&self.user);
        }
        started
    }

    /// Per-user limits on starting generations: messages per minute, and conversations
    /// generating at once. An admitted conversation is reserved, so that sends from two
    /// sockets at once both count; [`Self::generate`] settles the reservation. A send
    /// refused after the rate limit let it through is taken back from the count.
    async fn admit_generation(&self, conv: ConversationId) -> Result<(), Refusal> {
        let st = &self.state;
        let per_minute = st.limits.messages_per_minute;
        if !lock(&st.sends).admit(self.user, Instant::now(), per_minute) {
            return Err((
                "rate_limited",
                format!("at most {per_minute} messages a minute; wait a little"),
            ));
        }
        let reserved = self.reserve_generation(conv).await;
        if reserved.is_err() {
            lock(&st.sends).take_back(&self.user);
        }
        reserved
    }

    /// Reserves `conv` a generation, within the limit on conversations generating at once,
    /// and unless the user's conversations are moving.
    async fn reserve_generation(&self, conv: ConversationId) -> Result<(), Refusal> {
        let st = &self.state;
        // Which of the others that started are still generating (asked outside the lock).
        let started: Vec<ConversationId> = lock(&st.generating)
            .get(&self.user)
            .map(|m| {
                m.iter()
                    .filter(|&(c, g)| g.started && *c != conv)
                    .map(|(c, _)| *c)
                    .collect()
            })
            .unwrap_or_default();
        let mut idle = Vec::new();
        for &c in &started {
            let generating = match self.session(c).await {
                Ok(session) => call!(session, SessionMsg::IsGenerating).unwrap_or(false),
                Err(_) => false,
            };
            if !generating {
                idle.push(c);
            }
        }
        let mut generating = lock(&st.generating);
        if st.is_moving(self.user) {
            return Err((
                "conversations_moving",
                "this browser's conversations are moving to another sign-in: try again".into(),
            ));
        }
        let set = generating.entry(self.user).or_default();
        // Those found idle are no longer started; they go unless a request for them is
        // admitted and not yet answered (whatever their session said meanwhile).
        for c in idle {
            if let Some(g) = set.get_mut(&c) {
                g.started = false;
                if g.pending == 0 {
                    set.remove(&c);
                }
            }
        }
        if set.keys().filter(|c| **c != conv).count() >= st.limits.concurrent_generations {
            return Err((
                "too_many_generations",
                format!(
                    "at most {} answers at once; wait for one to finish",
                    st.limits.concurrent_generations
                ),
            ));
        }
        set.entry(conv).or_default().pending += 1;
        Ok(())
    }
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    ("internal_error", e.to_string())
}

/// Deletes a conversation after stopping its session (and any generation in it).
pub async fn delete_conversation(
    state: &AppState,
    user: UserId,
    conv: ConversationId,
) -> Result<(), StoreError> {
    if let Ok(Ok(session)) = call!(state.registry, RegistryMsg::Open, user, conv) {
        let _ = call!(session, SessionMsg::Stop);
        session.stop(Some("deleted".into()));
    }
    state.store.delete_conversation(user, conv).await
}
