//! The HTTP and WebSocket server (axum): the page, the socket, a small REST API, health and
//! Prometheus metrics. It speaks to actors and the store, never to the engine directly.

mod export;
mod identity;
mod limits;
mod rest;
mod ws;

pub use limits::Limits;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use ractor::{Actor, ActorRef};
use tokio::sync::{broadcast, watch};

use crate::actors::registry::{RegistryArgs, RegistryMsg, SessionRegistry};
use crate::actors::{ModelActor, ModelMsg, SchedulerConfig};
use crate::engine::Engine;
use crate::store::{Conversation, ConversationId, Settings, Store, StoreError, UserId};
use limits::{NewUserLog, SendLog};

/// A conversation counted against `concurrent_generations`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Generating {
    /// An answer was started in it (and was generating when last asked).
    started: bool,
    /// Requests admitted and not yet answered by the session.
    pending: usize,
}

pub struct ServerConfig {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub engine: Arc<Engine>,
    pub scheduler: SchedulerConfig,
    pub limits: Limits,
    /// Origins allowed to open the WebSocket besides the server's own.
    pub allowed_origins: Vec<String>,
    /// A session with nobody watching and nothing to do stops after this long.
    pub session_idle: Duration,
    /// Take a client's address from the last `X-Forwarded-For` entry (set only behind a
    /// reverse proxy that appends it: anyone else could write that header).
    pub trust_forwarded_for: bool,
    /// When set, `/metrics` answers only `Authorization: Bearer` with this token.
    pub metrics_token: Option<String>,
}

pub(crate) struct AppState {
    store: Store,
    registry: ActorRef<RegistryMsg>,
    model: ActorRef<ModelMsg>,
    limits: Limits,
    allowed_origins: Vec<String>,
    trust_forwarded_for: bool,
    metrics_token: Option<String>,
    metrics: PrometheusHandle,
    sockets: Mutex<HashMap<UserId, usize>>,
    sends: Mutex<SendLog>,
    /// Users stored per client address in the last hour.
    new_users: Mutex<NewUserLog>,
    /// Users some of whose logins went (signed out from elsewhere, or a browser that signed
    /// in as someone else), and why: their sockets check their token again.
    identity_changes: broadcast::Sender<(UserId, &'static str)>,
    /// Per user, the conversations generating, or about to.
    generating: Mutex<HashMap<UserId, HashMap<ConversationId, Generating>>>,
    /// Users whose conversations are moving to another user (a link redeemed with `merge`);
    /// locked after `generating` where both are held.
    moving: Mutex<HashSet<UserId>>,
    shutdown: watch::Receiver<bool>,
}

impl AppState {
    /// Marks `user`'s conversations as moving until the guard drops: no answer of theirs
    /// starts meanwhile, and none may be starting now ([`StoreError::Busy`]). The store
    /// refuses the move while an answer is streaming, but an answer starts in two writes (the
    /// question, then its streaming row): a move between them would leave the question
    /// without its answer, and the answer nowhere to go.
    fn begin_move(&self, user: UserId) -> Result<MoveGuard<'_>, StoreError> {
        let generating = lock(&self.generating);
        let starting = generating
            .get(&user)
            .is_some_and(|convs| convs.values().any(|g| g.pending > 0));
        if starting || !lock(&self.moving).insert(user) {
            return Err(StoreError::Busy);
        }
        Ok(MoveGuard { state: self, user })
    }

    /// Whether `user`'s conversations are moving (the caller holds `generating`).
    fn is_moving(&self, user: UserId) -> bool {
        lock(&self.moving).contains(&user)
    }
}

/// Holds a user's conversations still while they move (see [`AppState::begin_move`]); the
/// mark goes however the request ends, a dropped connection included.
struct MoveGuard<'a> {
    state: &'a AppState,
    user: UserId,
}

impl Drop for MoveGuard<'_> {
    fn drop(&mut self) {
        lock(&self.state.moving).remove(&self.user);
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A conversation to create, as the socket and the REST API take it.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewConversation {
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub system_prompt: String,
    #[serde(default)]
    pub settings: Settings,
    #[serde(default)]
    pub reasoning: bool,
}

/// Why a conversation was not created.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotCreated {
    /// Its owner would be one more new user from an address that has stored this many in the
    /// last hour.
    #[error("at most {limit} new users an hour from one address; try again later")]
    TooManyNewUsers { limit: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl NotCreated {
    pub fn code(&self) -> &'static str {
        match self {
            NotCreated::TooManyNewUsers { .. } => "too_many_new_users",
            NotCreated::Store(e) => e.code(),
        }
    }
}

/// Creates a conversation for `user`, who called with `token` from `client`. When that stores
/// them (a visitor's first conversation), they count against the new users of the client's
/// address this hour, and a creation the store refuses gives its place back.
pub(crate) async fn create_conversation(
    state: &AppState,
    token: Option<&str>,
    user: UserId,
    client: IpAddr,
    new: &NewConversation,
) -> Result<Conversation, NotCreated> {
    let address = limits::address_key(client);
    let new_user = match token {
        Some(t) => state.store.would_store_visitor(t, user).await?,
        None => false,
    };
    if new_user {
        let limit = state.limits.new_users_per_address_per_hour;
        if !lock(&state.new_users).admit(address, Instant::now(), limit) {
            tracing::info!(%address, limit, "refused a new user: too many from this address this hour");
            return Err(NotCreated::TooManyNewUsers { limit });
        }
    }
    let created = state
        .store
        .create_conversation_for(
            token,
            user,
            &new.title,
            &new.system_prompt,
            &new.settings,
            new.reasoning,
        )
        .await;
    if created.is_err() && new_user {
        lock(&state.new_users).take_back(&address);
    }
    Ok(created?)
}

/// The process-wide Prometheus recorder (installed once).
fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle())
        })
        .clone()
}

/// A running server.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub store: Store,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    registry: ActorRef<RegistryMsg>,
    model: ActorRef<ModelMsg>,
}

impl RunningServer {
    /// Stops accepting, closes sockets with 1001, marks streaming answers interrupted (with their
    /// text), and returns when done.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        let _ = self
            .registry
            .get_cell()
            .stop_children_and_wait(Some("shutdown".into()), Some(Duration::from_secs(3)))
            .await;
        self.registry.stop(None);
        self.model.stop(None);
        match self.store.recover_interrupted().await {
            Ok(n) if n > 0 => {
                tracing::info!(messages = n, "streaming answers saved as interrupted")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "could not mark streaming answers"),
        }
        tracing::info!("server stopped");
    }
}

/// Opens the store, starts the actors and serves on `config.addr` until `shutdown`.
pub async fn start(config: ServerConfig) -> Result<RunningServer> {
    std::fs::create_dir_all(&config.data_dir)?;
    let store = Store::open(&config.data_dir.join("smolchat.db"))
        .await?
        .with_max_conversations(config.limits.conversations_per_user);
    let (model, _) = Actor::spawn(
        None,
        ModelActor,
        (config.engine.clone(), config.scheduler.clone()),
    )
    .await?;
    let args = RegistryArgs {
        store: store.clone(),
        model: model.clone(),
        engine: config.engine.clone(),
        idle: config.session_idle,
    };
    let (registry, _) = Actor::spawn(None, SessionRegistry, args).await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    if config.metrics_token.is_none() && !config.addr.ip().is_loopback() {
        tracing::warn!(
            "/metrics is open to anyone who reaches this address: set --metrics-token, or keep \
             /metrics behind the reverse proxy"
        );
    }
    let state = Arc::new(AppState {
        store: store.clone(),
        registry: registry.clone(),
        model: model.clone(),
        limits: config.limits,
        allowed_origins: config.allowed_origins,
        trust_forwarded_for: config.trust_forwarded_for,
        metrics_token: config.metrics_token,
        metrics: metrics_handle(),
        sockets: Mutex::new(HashMap::new()),
        sends: Mutex::new(SendLog::per_minute()),
        new_users: Mutex::new(NewUserLog::per_hour()),
        identity_changes: broadcast::channel(64).0,
        generating: Mutex::new(HashMap::new()),
        moving: Mutex::new(HashSet::new()),
        shutdown: shutdown_rx.clone(),
    });
    let app = router(state);
    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    let addr = listener.local_addr()?;
    let mut stop = shutdown_rx;
    let task = tokio::spawn(async move {
        let serve = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "server error");
        }
    });
    tracing::info!(%addr, "smolchat is listening: open http://{addr}/");
    Ok(RunningServer {
        addr,
        store,
        shutdown: shutdown_tx,
        task,
        registry,
        model,
    })
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(rest::index))
        .route("/app.js", get(rest::app_js))
        .route("/style.css", get(rest::style_css))
        .route("/vendor/marked.esm.js", get(rest::marked_js))
        .route("/vendor/purify.es.mjs", get(rest::purify_js))
        .route("/ws", get(ws::upgrade))
        .route("/api/conversations", get(rest::list).post(rest::create))
        .route(
            "/api/conversations/{id}",
            get(rest::get_one).patch(rest::patch).delete(rest::delete),
        )
        .route("/api/conversations/{id}/export", get(rest::export))
        .route("/api/link", axum::routing::post(rest::create_link))
        .route("/api/link/redeem", axum::routing::post(rest::redeem_link))
        .route(
            "/api/logins/sign-out-others",
            axum::routing::post(rest::sign_out_others),
        )
        .route("/healthz", get(rest::healthz))
        .route("/readyz", get(rest::readyz))
        .route("/metrics", get(rest::metrics))
        .with_state(state)
}

/// Serves until Ctrl-C or SIGTERM, then shuts down gracefully.
pub async fn run(config: ServerConfig) -> Result<()> {
    let server = start(config).await?;
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
