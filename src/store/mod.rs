//! The store: users, login sessions, conversations and messages in SQLite, through sqlx.
//!
//! - WAL journal, so readers never wait for the writer.
//! - One writer: writes go through a pool of one connection, and every write transaction starts
//!   with `BEGIN IMMEDIATE`, taking the write lock first instead of failing half-way on upgrade.
//! - `synchronous = NORMAL`: in WAL mode a commit survives a crash of the process (the WAL is
//!   written before the commit returns); only a power cut can lose the last commits. Streaming
//!   checkpoints are frequent, and fsync on each would cost more than that risk is worth.
//! - Foreign keys on. Every query that reads or writes a conversation or its messages is scoped
//!   by the owner: someone else's conversation looks exactly like one that does not exist.
//!
//! SQL lives only here; nothing here knows about actors or HTTP.

mod conversations;
mod links;
mod types;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Row, Sqlite, Transaction};

pub use links::{Redeemer, LINK_CODE_TTL_MS, MAX_LOGINS};
pub use types::*;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing does not exist, or belongs to someone else.
    #[error("not found")]
    NotFound,
    #[error("invalid: {0}")]
    Invalid(String),
    /// The user holds as many conversations as they may.
    #[error("at most {0} conversations per user: delete some first")]
    TooManyConversations(usize),
    /// A link code that is not one, was used already or has expired.
    #[error("this sign-in link is not valid (any more): make a new one")]
    BadLinkCode,
    /// Signing this browser in elsewhere would hide this many conversations of its own.
    #[error("this browser holds {} of its own, which the sign-in would hide", conversations(*.0))]
    WouldHide(usize),
    /// The user holds as many logins as they may.
    #[error("already signed in on {0} browsers and programs: sign the others out first")]
    TooManyLogins(usize),
    /// The login the request came with went meanwhile (signed out from elsewhere, or its
    /// browser signed in as someone else).
    #[error("this browser's login went (signed out, or signed in elsewhere): reload the page")]
    SignedOut,
    /// An answer is being written where the change would move it.
    #[error("an answer is still being written in this browser: try again when it is done")]
    Busy,
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl StoreError {
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::NotFound => "not_found",
            StoreError::Invalid(_) => "invalid_request",
            StoreError::TooManyConversations(_) => "too_many_conversations",
            StoreError::BadLinkCode => "invalid_link",
            StoreError::WouldHide(_) => "would_hide_conversations",
            StoreError::TooManyLogins(_) => "too_many_logins",
            StoreError::Busy => "already_generating",
            StoreError::SignedOut => "signed_out",
            StoreError::Db(_) => "storage_error",
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Why [`Store::backup`] wrote no copy.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("there is no database at {}", .0.display())]
    NoDatabase(std::path::PathBuf),
    #[error("{} exists already: name a new file", .0.display())]
    Exists(std::path::PathBuf),
    #[error("reading the database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("writing the copy: {0}")]
    Io(#[from] std::io::Error),
}

fn conversations(n: usize) -> String {
    match n {
        1 => "1 conversation".into(),
        n => format!("{n} conversations"),
    }
}

/// Migrations, applied in order at start-up; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_init.sql"),
    include_str!("../../migrations/0002_fts_skips_streaming.sql"),
    include_str!("../../migrations/0003_server_keys.sql"),
    include_str!("../../migrations/0004_link_codes.sql"),
    include_str!("../../migrations/0005_conversation_pages.sql"),
];

/// A visitor's token: `v1.<user id>.<nonce>.<HMAC-SHA256 of "<user id>.<nonce>">` (the nonce
/// and the MAC in hex). The nonce makes each token one of a kind, so that its hash can be the
/// stored visitor's login: the key alone cannot make a token for a stored user.
const VISITOR_PREFIX: &str = "v1.";

#[derive(Clone)]
pub struct Store {
    read: SqlitePool,
    write: SqlitePool,
    /// Signs visitor tokens; made at the first start and kept in the database.
    visitor_key: Arc<[u8; 32]>,
    /// Most conversations one user may hold.
    max_conversations: usize,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Rejects text the store must never hold.
pub(crate) fn check_text(what: &str, s: &str, max: usize) -> Result<()> {
    if s.contains('\0') {
        return Err(StoreError::Invalid(format!(
            "{what} contains a NUL character"
        )));
    }
    if s.len() > max {
        return Err(StoreError::Invalid(format!(
            "{what} is longer than {max} bytes"
        )));
    }
    Ok(())
}

fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `user` has a row in `users`.
async fn user_stored<'e>(db: impl sqlx::SqliteExecutor<'e>, user: UserId) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS(SELECT 1 FROM users WHERE id = ?)")
            .bind(user.to_string())
            .fetch_one(db)
            .await?,
    )
}

/// Two v4 UUIDs (244 random bits), in hex: a login token or a link code.
fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

impl Store {
    /// Opens (creating if needed) the database at `path`, applies migrations, and marks
    /// messages left `streaming` by a previous process as `interrupted` (their text is kept).
    pub async fn open(path: &Path) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.read_only(true))
            .await?;
        let mut store = Self {
            read,
            write,
            visitor_key: Arc::new([0; 32]),
            max_conversations: usize::MAX,
        };
        store.migrate().await?;
        store.visitor_key = Arc::new(store.key("visitor").await?);
        let n = store.recover_interrupted().await?;
        if n > 0 {
            tracing::warn!(
                messages = n,
                "messages left streaming by the last run are now interrupted"
            );
        }
        Ok(store)
    }

    /// Copies the database at `db` into a new file `out`, as it stands at one moment, while a
    /// server may be using it: SQLite's `VACUUM INTO` over a read-only connection, so nothing
    /// in `db` changes (an answer being written is copied as far as it got; opening the copy
    /// marks it interrupted). The copy is written beside `out`, synced, and linked into place
    /// once whole; a file at `out` is never replaced.
    pub async fn backup(db: &Path, out: &Path) -> std::result::Result<(), BackupError> {
        if !db.is_file() {
            return Err(BackupError::NoDatabase(db.to_owned()));
        }
        if out.exists() {
            return Err(BackupError::Exists(out.to_owned()));
        }
        let partial = std::path::PathBuf::from(format!("{}.partial", out.display()));
        if partial.exists() {
            return Err(BackupError::Exists(partial));
        }
        let copied = async {
            let mut conn = SqliteConnectOptions::new()
                .filename(db)
                .read_only(true)
                .busy_timeout(Duration::from_secs(10))
                .connect()
                .await?;
            sqlx::query("VACUUM INTO ?")
                .bind(partial.to_string_lossy())
                .execute(&mut conn)
                .await?;
            conn.close().await?;
            std::fs::File::open(&partial)?.sync_all()?;
            // A hard link fails where `out` has appeared meanwhile; rename would replace it.
            std::fs::hard_link(&partial, out).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => BackupError::Exists(out.to_owned()),
                _ => BackupError::Io(e),
            })?;
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok::<_, BackupError>(())
        }
        .await;
        let _ = std::fs::remove_file(&partial);
        copied
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.begin().await?;
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *tx)
            .await?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            sqlx::raw_sql(sql).execute(&mut *tx).await?;
            sqlx::raw_sql(&format!("PRAGMA user_version = {}", i + 1))
                .execute(&mut *tx)
                .await?;
            tracing::info!(migration = i + 1, "database migrated");
        }
        tx.commit().await?;
        Ok(())
    }

    /// The server key `name`, made (from the OS's random source) if there is none yet.
    async fn key(&self, name: &str) -> Result<[u8; 32]> {
        let mut fresh = [0u8; 32];
        getrandom::fill(&mut fresh)
            .map_err(|e| StoreError::Db(sqlx::Error::Io(std::io::Error::other(e))))?;
        let mut tx = self.begin().await?;
        sqlx::query("INSERT OR IGNORE INTO server_keys (name, value) VALUES (?, ?)")
            .bind(name)
            .bind(&fresh[..])
            .execute(&mut *tx)
            .await?;
        let value: Vec<u8> = sqlx::query_scalar("SELECT value FROM server_keys WHERE name = ?")
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        value
            .try_into()
            .map_err(|_| StoreError::Invalid(format!("the server key {name:?} is not 32 bytes")))
    }

    /// The same store, refusing a user's conversation beyond the `n`th
    /// ([`StoreError::TooManyConversations`]).
    pub fn with_max_conversations(mut self, n: usize) -> Self {
        self.max_conversations = n;
        self
    }

    /// A write transaction that holds the write lock from its first statement.
    pub(crate) async fn begin(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.write.begin_with("BEGIN IMMEDIATE").await?)
    }

    pub(crate) fn reader(&self) -> &SqlitePool {
        &self.read
    }

    /// Marks every `streaming` message `interrupted`; returns how many there were.
    pub async fn recover_interrupted(&self) -> Result<u64> {
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "UPDATE messages SET status = 'interrupted', updated_at = ? WHERE status = 'streaming'",
        )
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    /// A new anonymous visitor and their token. Nothing is stored: the visitor becomes a user
    /// with their first conversation ([`Self::create_conversation_for`]), so a page view (a crawler, a
    /// health check) costs the database nothing. The token is the user id and a nonce, signed
    /// with the server's visitor key.
    pub fn new_visitor(&self) -> (UserId, String) {
        let user = UserId::new();
        let body = format!("{user}.{}", uuid::Uuid::new_v4().simple());
        let mac = hex::encode(self.visitor_mac(&body).finalize().into_bytes());
        (user, format!("{VISITOR_PREFIX}{body}.{mac}"))
    }

    fn visitor_mac(&self, body: &str) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.visitor_key[..])
            .expect("HMAC takes a key of any length");
        mac.update(body.as_bytes());
        mac
    }

    /// The visitor a visitor token names, if its signature holds.
    fn visitor(&self, token: &str) -> Option<UserId> {
        let (body, mac) = token.strip_prefix(VISITOR_PREFIX)?.rsplit_once('.')?;
        self.visitor_mac(body)
            .verify_slice(&hex::decode(mac).ok()?)
            .ok()?;
        let (id, nonce) = body.split_once('.')?;
        hex::decode(nonce).ok().filter(|n| n.len() == 16)?;
        id.parse().ok()
    }

    /// Stores `owner`, when `token` is their visitor token, as a user whose login is this
    /// token, so that they can own conversations. Nothing happens for any other token, or for
    /// a visitor stored already (by this token: the first to store an id is its only login).
    async fn store_visitor(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        token: &str,
        owner: UserId,
    ) -> Result<()> {
        let Some(user) = self.visitor(token).filter(|v| *v == owner) else {
            return Ok(());
        };
        let now = now_ms();
        let created = sqlx::query("INSERT OR IGNORE INTO users (id, created_at) VALUES (?, ?)")
            .bind(user.to_string())
            .bind(now)
            .execute(&mut **tx)
            .await?
            .rows_affected()
            == 1;
        if created {
            sqlx::query("INSERT INTO login_sessions (token_hash, user_id, created_at, last_seen_at) VALUES (?, ?, ?, ?)")
                .bind(hash_token(token))
                .bind(user.to_string())
                .bind(now)
                .bind(now)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Whether a conversation created for `owner` with `token` would store them as a new
    /// user: the token is their visitor token and they are not stored yet.
    pub async fn would_store_visitor(&self, token: &str, owner: UserId) -> Result<bool> {
        if self.visitor(token) != Some(owner) {
            return Ok(false);
        }
        Ok(!user_stored(&self.read, owner).await?)
    }

    /// A new anonymous user.
    pub async fn create_user(&self) -> Result<UserId> {
        let id = UserId::new();
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO users (id, created_at) VALUES (?, ?)")
            .bind(id.to_string())
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// A new login token for `user`; only its hash is stored, the token itself is returned once.
    pub async fn create_login(&self, user: UserId) -> Result<String> {
        let mut tx = self.begin().await?;
        let token = self.insert_login(&mut tx, user).await?;
        tx.commit().await?;
        Ok(token)
    }

    async fn insert_login(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        user: UserId,
    ) -> Result<String> {
        let token = random_token();
        let now = now_ms();
        sqlx::query("INSERT INTO login_sessions (token_hash, user_id, created_at, last_seen_at) VALUES (?, ?, ?, ?)")
            .bind(hash_token(&token))
            .bind(user.to_string())
            .bind(now)
            .bind(now)
            .execute(&mut **tx)
            .await?;
        Ok(token)
    }

    /// The user a token belongs to: a login's (looked up), or that of a visitor not stored yet
    /// (the signature checked). A signed token for a stored user that is not their login is
    /// nobody's: only someone holding the key could have made it.
    pub async fn user_for_token(&self, token: &str) -> Result<Option<UserId>> {
        if token.is_empty() || token.len() > 256 {
            return Ok(None);
        }
        let row = sqlx::query("SELECT user_id FROM login_sessions WHERE token_hash = ?")
            .bind(hash_token(token))
            .fetch_optional(&self.read)
            .await?;
        if let Some(row) = row {
            return Ok(row.get::<String, _>(0).parse().ok());
        }
        let Some(visitor) = self.visitor(token) else {
            return Ok(None);
        };
        let stored = user_stored(&self.read, visitor).await?;
        Ok((!stored).then_some(visitor))
    }
}
