//! Signing another browser in as the same user: a one-time code, shown as a link on one device
//! and redeemed on the other, which gets a login of its own. The conversations the second
//! browser had may go along with it (asked first); nothing else of its old user does.

use sqlx::Row;

use super::{hash_token, now_ms, random_token, user_stored, Result, Store, StoreError, UserId};

/// How long a link code can be redeemed, in ms.
pub const LINK_CODE_TTL_MS: i64 = 10 * 60 * 1000;

/// Logins one user may hold (browsers and bearer tokens); a sign-in beyond is refused
/// ([`StoreError::TooManyLogins`]) rather than signing an old one out unasked.
pub const MAX_LOGINS: usize = 50;

/// The browser that redeems a link code: who it was, with which token.
#[derive(Debug, Clone, Copy)]
pub struct Redeemer<'a> {
    pub user: UserId,
    pub token: &'a str,
}

impl Store {
    /// A one-time code that signs another browser in as `user` for the next ten minutes; it
    /// replaces any code of `user`'s not used yet. [`StoreError::NotFound`] when `user` is not
    /// stored (a visitor who has not started a conversation has nothing to take along).
    pub async fn create_link_code(&self, user: UserId) -> Result<String> {
        let code = random_token();
        let now = now_ms();
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM link_codes WHERE expires_at <= ? OR user_id = ?")
            .bind(now)
            .bind(user.to_string())
            .execute(&mut *tx)
            .await?;
        if !user_stored(&mut *tx, user).await? {
            return Err(StoreError::NotFound);
        }
        sqlx::query("INSERT INTO link_codes (code_hash, user_id, expires_at) VALUES (?, ?, ?)")
            .bind(hash_token(&code))
            .bind(user.to_string())
            .bind(now + LINK_CODE_TTL_MS)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(code)
    }

    /// Redeems a link code for the browser `by`: returns the code's user and a new login
    /// token for this browser, whose old login (if its token was one) goes. When `by` holds
    /// conversations, the new login would hide them: without `merge` nothing changes
    /// ([`StoreError::WouldHide`]); with it they move to the code's user, within that user's
    /// conversation limit, and never while one of their answers is being written
    /// ([`StoreError::Busy`]). `by`'s other logins stay as they were. All in one transaction:
    /// a refusal uses up no code.
    pub async fn redeem_link_code(
        &self,
        code: &str,
        by: Option<Redeemer<'_>>,
        merge: bool,
    ) -> Result<(UserId, String)> {
        self.redeem_link_code_holding(code, by, merge, |_| Ok(()))
            .await
    }

    /// [`Store::redeem_link_code`], calling `hold` with `by`'s user once the code is good
    /// and that user's conversations are about to move, and keeping what it returns until
    /// the move is committed or refused. The server holds back the answers that would start
    /// meanwhile; `hold`'s error refuses the move, as every other refusal does, with nothing
    /// changed.
    pub async fn redeem_link_code_holding<G>(
        &self,
        code: &str,
        by: Option<Redeemer<'_>>,
        merge: bool,
        hold: impl FnOnce(UserId) -> Result<G>,
    ) -> Result<(UserId, String)> {
        let mut held = None;
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "DELETE FROM link_codes WHERE code_hash = ? AND expires_at > ? RETURNING user_id",
        )
        .bind(hash_token(code))
        .bind(now_ms())
        .fetch_optional(&mut *tx)
        .await?;
        let user: UserId = row
            .and_then(|r| r.get::<String, _>(0).parse().ok())
            .ok_or(StoreError::BadLinkCode)?;
        let into = user.to_string();
        let logins: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM login_sessions WHERE user_id = ?")
                .bind(&into)
                .fetch_one(&mut *tx)
                .await?;
        if logins as usize >= MAX_LOGINS {
            return Err(StoreError::TooManyLogins(MAX_LOGINS));
        }
        if let Some(by) = by.filter(|b| b.user != user) {
            let from = by.user.to_string();
            // A visitor not stored yet is stored now, with no login: their token names no one
            // from here on, so this browser's other tabs sign out too.
            sqlx::query("INSERT OR IGNORE INTO users (id, created_at) VALUES (?, ?)")
                .bind(&from)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            let count = |owner: &str| {
                sqlx::query_scalar::<_, i64>(
                    "SELECT COUNT(*) FROM conversations WHERE owner_id = ?",
                )
                .bind(owner.to_owned())
            };
            let own = count(&from).fetch_one(&mut *tx).await? as usize;
            if own > 0 && !merge {
                return Err(StoreError::WouldHide(own));
            }
            if own > 0 {
                held = Some(hold(by.user)?);
                let streaming: bool = sqlx::query_scalar(
                    "SELECT EXISTS(SELECT 1 FROM messages m JOIN conversations c ON c.id = m.conversation_id \
                     WHERE c.owner_id = ? AND m.status = 'streaming')",
                )
                .bind(&from)
                .fetch_one(&mut *tx)
                .await?;
                if streaming {
                    return Err(StoreError::Busy);
                }
                let theirs = count(&into).fetch_one(&mut *tx).await? as usize;
                if own + theirs > self.max_conversations {
                    return Err(StoreError::TooManyConversations(self.max_conversations));
                }
                sqlx::query("UPDATE conversations SET owner_id = ? WHERE owner_id = ?")
                    .bind(&into)
                    .bind(&from)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query("DELETE FROM login_sessions WHERE token_hash = ? AND user_id = ?")
                .bind(hash_token(by.token))
                .bind(&from)
                .execute(&mut *tx)
                .await?;
        }
        let token = self.insert_login(&mut tx, user).await?;
        tx.commit().await?;
        drop(held);
        Ok((user, token))
    }

    /// Signs every other browser and program of `user` out: removes their logins and any
    /// link code not yet used, keeping the login of `keep` (the caller's token). Returns how
    /// many logins went.
    pub async fn sign_out_others(&self, user: UserId, keep: &str) -> Result<u64> {
        let mut tx = self.begin().await?;
        let gone = sqlx::query("DELETE FROM login_sessions WHERE user_id = ? AND token_hash != ?")
            .bind(user.to_string())
            .bind(hash_token(keep))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM link_codes WHERE user_id = ?")
            .bind(user.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(gone)
    }
}
