//! Signing another browser in as the same user: a one-time code, shown as a link on one device
//! and redeemed on the other, which gets a login of its own. What the second browser had
//! (its conversations, its other logins) joins the user it signed in as.

use sqlx::Row;

use super::{hash_token, now_ms, random_token, Result, Store, StoreError, UserId};

/// How long a link code can be redeemed, in ms.
pub const LINK_CODE_TTL_MS: i64 = 10 * 60 * 1000;

impl Store {
    /// A one-time code that signs another browser in as `user` for the next ten minutes.
    /// [`StoreError::NotFound`] when `user` is not stored (a visitor who has not started a
    /// conversation has nothing to take along).
    pub async fn create_link_code(&self, user: UserId) -> Result<String> {
        let code = random_token();
        let now = now_ms();
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM link_codes WHERE expires_at <= ?")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let stored: bool = sqlx::query_scalar("SELECT EXISTS(SELECT 1 FROM users WHERE id = ?)")
            .bind(user.to_string())
            .fetch_one(&mut *tx)
            .await?;
        if !stored {
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

    /// Redeems a link code for a browser that was `current`: returns the code's user and a
    /// new login token for this browser. When `current` holds conversations of its own, they
    /// would be hidden by the new login: without `merge` nothing changes
    /// ([`StoreError::WouldHide`], the code stays good); with it they and `current`'s logins
    /// move to the code's user and `current` is removed, all in one transaction and within
    /// the user's conversation limit. While one of `current`'s answers is being written
    /// nothing changes ([`StoreError::Busy`]).
    pub async fn redeem_link_code(
        &self,
        code: &str,
        current: Option<UserId>,
        merge: bool,
    ) -> Result<(UserId, String)> {
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
        if let Some(from) = current.filter(|c| *c != user) {
            let (from, into) = (from.to_string(), user.to_string());
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
            if merge {
                for sql in [
                    "UPDATE conversations SET owner_id = ?2 WHERE owner_id = ?1",
                    "UPDATE login_sessions SET user_id = ?2 WHERE user_id = ?1",
                    "UPDATE link_codes SET user_id = ?2 WHERE user_id = ?1",
                    "DELETE FROM users WHERE id = ?1",
                ] {
                    sqlx::query(sql)
                        .bind(&from)
                        .bind(&into)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        let token = self.insert_login(&mut tx, user).await?;
        tx.commit().await?;
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
