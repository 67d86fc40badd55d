//! Conversations, messages and search; every query is scoped by the owner.

use std::collections::HashMap;

use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use super::{check_text, hash_token, now_ms, Result, Store, StoreError};
use super::{
    Conversation, ConversationId, ConversationPatch, ListCursor, Message, MessageId,
    MessageOutcome, MessageStatus, OverflowPolicy, Role, SearchHit, Settings, UserId,
};

/// Longest message content, in bytes.
pub const MAX_CONTENT: usize = 1 << 20;
const MAX_TITLE: usize = 200;
const MAX_SYSTEM_PROMPT: usize = 32 * 1024;

const CONVERSATION_COLUMNS: &str =
    "id, title, system_prompt, settings, reasoning, overflow_policy, current_leaf_id, created_at, updated_at";
const MESSAGE_COLUMNS: &str =
    "m.id, m.conversation_id, m.parent_id, m.role, m.content, m.reasoning, m.status, \
     m.finish_reason, m.error, m.prompt_tokens, m.cached_tokens, m.completion_tokens, m.ttft_ms, \
     m.tokens_per_second, m.created_at, m.updated_at";

fn parse<T: std::str::FromStr>(s: &str) -> Result<T> {
    s.parse()
        .map_err(|_| StoreError::Invalid(format!("corrupt value `{s}` in the database")))
}

fn conversation(r: &SqliteRow) -> Result<Conversation> {
    let settings: String = r.get("settings");
    Ok(Conversation {
        id: parse(r.get("id"))?,
        title: r.get("title"),
        system_prompt: r.get("system_prompt"),
        settings: serde_json::from_str(&settings).unwrap_or_default(),
        reasoning: r.get::<i64, _>("reasoning") != 0,
        overflow_policy: parse(r.get("overflow_policy"))?,
        current_leaf_id: r
            .get::<Option<String>, _>("current_leaf_id")
            .map(|s| parse(&s))
            .transpose()?,
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    })
}

fn message(r: &SqliteRow) -> Result<Message> {
    Ok(Message {
        id: parse(r.get("id"))?,
        conversation_id: parse(r.get("conversation_id"))?,
        parent_id: r
            .get::<Option<String>, _>("parent_id")
            .map(|s| parse(&s))
            .transpose()?,
        role: parse(r.get("role"))?,
        content: r.get("content"),
        reasoning: r.get("reasoning"),
        status: parse(r.get("status"))?,
        finish_reason: r.get("finish_reason"),
        error: r.get("error"),
        prompt_tokens: r.get("prompt_tokens"),
        cached_tokens: r.get("cached_tokens"),
        completion_tokens: r.get("completion_tokens"),
        ttft_ms: r.get("ttft_ms"),
        tokens_per_second: r.get("tokens_per_second"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    })
}

/// A title from the first words of a message.
pub fn title_from(text: &str) -> String {
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    // At most 60 characters, and within MAX_TITLE bytes with the ellipsis (as a rename
    // would be held to).
    let mut t = String::new();
    for (i, c) in line.chars().enumerate() {
        if i == 60 || t.len() + c.len_utf8() + '…'.len_utf8() > MAX_TITLE {
            t.push('…');
            break;
        }
        t.push(c);
    }
    t
}

/// Turns free text into an FTS5 query of quoted terms (no operators from the user).
fn fts_query(q: &str) -> Option<String> {
    let terms: Vec<String> = q
        .split_whitespace()
        .take(16)
        .map(|t| format!("\"{}\"", t.replace('"', "\"\"")))
        .collect();
    (!terms.is_empty()).then(|| terms.join(" "))
}

impl Store {
    pub async fn create_conversation(
        &self,
        owner: UserId,
        title: &str,
        system_prompt: &str,
        settings: &Settings,
        reasoning: bool,
    ) -> Result<Conversation> {
        self.create_conversation_for(None, owner, title, system_prompt, settings, reasoning)
            .await
    }

    /// [`Self::create_conversation`] for an owner who called with `token`: a visitor not
    /// stored yet is stored with it (see [`Store::new_visitor`]), in the same transaction, so
    /// a refused conversation stores nothing. A token that is no login of `owner` (any more)
    /// is refused ([`StoreError::SignedOut`]).
    pub async fn create_conversation_for(
        &self,
        token: Option<&str>,
        owner: UserId,
        title: &str,
        system_prompt: &str,
        settings: &Settings,
        reasoning: bool,
    ) -> Result<Conversation> {
        check_text("the title", title, MAX_TITLE)?;
        check_text("the system prompt", system_prompt, MAX_SYSTEM_PROMPT)?;
        settings.validate().map_err(StoreError::Invalid)?;
        let id = ConversationId::new();
        let now = now_ms();
        let mut tx = self.begin().await?;
        if let Some(t) = token {
            self.store_visitor(&mut tx, t, owner).await?;
            // Checked in the transaction that writes: a login that went a moment ago (its
            // browser's conversations moved to another user with it) creates nothing.
            let signed_in: bool = sqlx::query_scalar(
                "SELECT EXISTS(SELECT 1 FROM login_sessions WHERE token_hash = ? AND user_id = ?)",
            )
            .bind(hash_token(t))
            .bind(owner.to_string())
            .fetch_one(&mut *tx)
            .await?;
            if !signed_in {
                return Err(StoreError::SignedOut);
            }
        }
        let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM conversations WHERE owner_id = ?")
            .bind(owner.to_string())
            .fetch_one(&mut *tx)
            .await?;
        if held as usize >= self.max_conversations {
            return Err(StoreError::TooManyConversations(self.max_conversations));
        }
        sqlx::query(
            "INSERT INTO conversations (id, owner_id, title, system_prompt, settings, reasoning, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id.to_string())
        .bind(owner.to_string())
        .bind(title)
        .bind(system_prompt)
        .bind(serde_json::to_string(settings).unwrap_or_else(|_| "{}".into()))
        .bind(reasoning as i64)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.conversation(owner, id).await
    }

    /// One's conversations, newest first.
    pub async fn list_conversations(&self, owner: UserId) -> Result<Vec<Conversation>> {
        self.conversations_page(owner, None, usize::MAX).await
    }

    /// At most `limit` of one's conversations, newest first, from just after `after`.
    pub async fn conversations_page(
        &self,
        owner: UserId,
        after: Option<ListCursor>,
        limit: usize,
    ) -> Result<Vec<Conversation>> {
        // In the order of the index `conversations_by_owner`, which the cursor seeks into.
        let cursor = match after {
            Some(_) => "AND (updated_at, id) < (?, ?)",
            None => "",
        };
        let sql = format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE owner_id = ? {cursor} \
             ORDER BY updated_at DESC, id DESC LIMIT ?"
        );
        let mut query = sqlx::query(&sql).bind(owner.to_string());
        if let Some(c) = after {
            query = query.bind(c.updated_at).bind(c.id.to_string());
        }
        let rows = query
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(self.reader())
            .await?;
        rows.iter().map(conversation).collect()
    }

    pub async fn conversation(&self, owner: UserId, id: ConversationId) -> Result<Conversation> {
        let sql = format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ? AND owner_id = ?"
        );
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .bind(owner.to_string())
            .fetch_optional(self.reader())
            .await?;
        row.as_ref()
            .map(conversation)
            .transpose()?
            .ok_or(StoreError::NotFound)
    }

    pub async fn update_conversation(
        &self,
        owner: UserId,
        id: ConversationId,
        patch: &ConversationPatch,
    ) -> Result<Conversation> {
        if let Some(t) = &patch.title {
            check_text("the title", t, MAX_TITLE)?;
        }
        if let Some(s) = &patch.system_prompt {
            check_text("the system prompt", s, MAX_SYSTEM_PROMPT)?;
        }
        if let Some(s) = &patch.settings {
            s.validate().map_err(StoreError::Invalid)?;
        }
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "UPDATE conversations SET title = COALESCE(?, title), system_prompt = COALESCE(?, system_prompt), \
             settings = COALESCE(?, settings), reasoning = COALESCE(?, reasoning), \
             overflow_policy = COALESCE(?, overflow_policy), updated_at = ? WHERE id = ? AND owner_id = ?",
        )
        .bind(patch.title.as_deref())
        .bind(patch.system_prompt.as_deref())
        .bind(patch.settings.as_ref().map(|s| serde_json::to_string(s).unwrap_or_default()))
        .bind(patch.reasoning.map(|r| r as i64))
        .bind(patch.overflow_policy.map(OverflowPolicy::as_str))
        .bind(now_ms())
        .bind(id.to_string())
        .bind(owner.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        self.conversation(owner, id).await
    }

    pub async fn delete_conversation(&self, owner: UserId, id: ConversationId) -> Result<()> {
        let mut tx = self.begin().await?;
        let n = sqlx::query("DELETE FROM conversations WHERE id = ? AND owner_id = ?")
            .bind(id.to_string())
            .bind(owner.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Adds a message under `parent` and makes it the conversation's current leaf. The first
    /// user message gives an untitled conversation its title.
    pub async fn add_message(
        &self,
        owner: UserId,
        conv: ConversationId,
        parent: Option<MessageId>,
        role: Role,
        content: &str,
        status: MessageStatus,
    ) -> Result<Message> {
        check_text("the message", content, MAX_CONTENT)?;
        let id = MessageId::new();
        let now = now_ms();
        let mut tx = self.begin().await?;
        let owned: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM conversations WHERE id = ? AND owner_id = ?")
                .bind(conv.to_string())
                .bind(owner.to_string())
                .fetch_optional(&mut *tx)
                .await?;
        if owned.is_none() {
            return Err(StoreError::NotFound);
        }
        if let Some(p) = parent {
            let in_conv: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM messages WHERE id = ? AND conversation_id = ?")
                    .bind(p.to_string())
                    .bind(conv.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
            if in_conv.is_none() {
                return Err(StoreError::NotFound);
            }
        }
        sqlx::query(
            "INSERT INTO messages (id, conversation_id, parent_id, role, content, status, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id.to_string())
        .bind(conv.to_string())
        .bind(parent.map(|p| p.to_string()))
        .bind(role.as_str())
        .bind(content)
        .bind(status.as_str())
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let title = if role == Role::User {
            title_from(content)
        } else {
            String::new()
        };
        sqlx::query(
            "UPDATE conversations SET current_leaf_id = ?, updated_at = ?, \
             title = CASE WHEN title = '' THEN ? ELSE title END WHERE id = ?",
        )
        .bind(id.to_string())
        .bind(now)
        .bind(title)
        .bind(conv.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.message(owner, id).await
    }

    /// Saves the partial text of a streaming message.
    pub async fn checkpoint_message(
        &self,
        owner: UserId,
        id: MessageId,
        content: &str,
        reasoning: &str,
    ) -> Result<()> {
        self.finish_message(owner, id, content, reasoning, &MessageOutcome::default())
            .await
    }

    /// Writes a message's text and, when `outcome.status` is set, how it ended.
    pub async fn finish_message(
        &self,
        owner: UserId,
        id: MessageId,
        content: &str,
        reasoning: &str,
        o: &MessageOutcome,
    ) -> Result<()> {
        check_text("the message", content, MAX_CONTENT)?;
        check_text("the reasoning", reasoning, MAX_CONTENT)?;
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "UPDATE messages SET content = ?, reasoning = ?, status = COALESCE(?, status), \
             finish_reason = COALESCE(?, finish_reason), error = COALESCE(?, error), \
             prompt_tokens = COALESCE(?, prompt_tokens), cached_tokens = COALESCE(?, cached_tokens), \
             completion_tokens = COALESCE(?, completion_tokens), ttft_ms = COALESCE(?, ttft_ms), \
             tokens_per_second = COALESCE(?, tokens_per_second), updated_at = ? \
             WHERE id = ? AND conversation_id IN (SELECT id FROM conversations WHERE owner_id = ?)",
        )
        .bind(content)
        .bind(reasoning)
        .bind(o.status.map(MessageStatus::as_str))
        .bind(o.finish_reason.as_deref())
        .bind(o.error.as_deref())
        .bind(o.prompt_tokens)
        .bind(o.cached_tokens)
        .bind(o.completion_tokens)
        .bind(o.ttft_ms)
        .bind(o.tokens_per_second)
        .bind(now_ms())
        .bind(id.to_string())
        .bind(owner.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    pub async fn message(&self, owner: UserId, id: MessageId) -> Result<Message> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m JOIN conversations c ON c.id = m.conversation_id \
             WHERE m.id = ? AND c.owner_id = ?"
        );
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .bind(owner.to_string())
            .fetch_optional(self.reader())
            .await?;
        row.as_ref()
            .map(message)
            .transpose()?
            .ok_or(StoreError::NotFound)
    }

    /// The messages from the root down to `leaf` (default: the current leaf).
    pub async fn branch(
        &self,
        owner: UserId,
        conv: ConversationId,
        leaf: Option<MessageId>,
    ) -> Result<Vec<Message>> {
        let c = self.conversation(owner, conv).await?;
        let Some(leaf) = leaf.or(c.current_leaf_id) else {
            return Ok(vec![]);
        };
        let sql = format!(
            "WITH RECURSIVE chain(id, depth) AS ( \
               SELECT id, 0 FROM messages WHERE id = ? AND conversation_id = ? \
               UNION ALL SELECT m.parent_id, chain.depth + 1 FROM messages m JOIN chain ON m.id = chain.id \
               WHERE m.parent_id IS NOT NULL) \
             SELECT {MESSAGE_COLUMNS} FROM chain JOIN messages m ON m.id = chain.id ORDER BY chain.depth DESC"
        );
        let rows = sqlx::query(&sql)
            .bind(leaf.to_string())
            .bind(conv.to_string())
            .fetch_all(self.reader())
            .await?;
        if rows.is_empty() {
            return Err(StoreError::NotFound);
        }
        rows.iter().map(message).collect()
    }

    /// The ids of the messages under `parent` (or the roots), oldest first: the versions to
    /// choose from.
    pub async fn children(
        &self,
        owner: UserId,
        conv: ConversationId,
        parent: Option<MessageId>,
    ) -> Result<Vec<MessageId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT m.id FROM messages m JOIN conversations c ON c.id = m.conversation_id \
             WHERE m.conversation_id = ? AND c.owner_id = ? AND m.parent_id IS ? \
             ORDER BY m.created_at, m.rowid",
        )
        .bind(conv.to_string())
        .bind(owner.to_string())
        .bind(parent.map(|p| p.to_string()))
        .fetch_all(self.reader())
        .await?;
        if ids.is_empty() {
            self.conversation(owner, conv).await?; // no children, or not the owner's?
        }
        ids.iter().map(|id| parse(id)).collect()
    }

    /// For every message of `branch` that has other versions (siblings under the same parent):
    /// all of them, oldest first. One query, whatever the length of the branch.
    pub async fn siblings(
        &self,
        owner: UserId,
        conv: ConversationId,
        branch: &[Message],
    ) -> Result<HashMap<MessageId, Vec<MessageId>>> {
        let rows: Vec<(Option<String>, String)> = sqlx::query_as(
            "SELECT m.parent_id, m.id FROM messages m JOIN conversations c ON c.id = m.conversation_id \
             WHERE m.conversation_id = ? AND c.owner_id = ? ORDER BY m.created_at, m.rowid",
        )
        .bind(conv.to_string())
        .bind(owner.to_string())
        .fetch_all(self.reader())
        .await?;
        if rows.is_empty() {
            self.conversation(owner, conv).await?; // empty, or not the owner's?
        }
        let mut by_parent: HashMap<Option<String>, Vec<MessageId>> = HashMap::new();
        for (parent, id) in &rows {
            by_parent
                .entry(parent.clone())
                .or_default()
                .push(parse(id)?);
        }
        Ok(branch
            .iter()
            .filter_map(|m| {
                let kids = by_parent.get(&m.parent_id.map(|p| p.to_string()))?;
                (kids.len() > 1).then(|| (m.id, kids.clone()))
            })
            .collect())
    }

    /// Shows the branch through `message`: the current leaf becomes its newest descendant
    /// (the newest child at every level), found and set in one statement.
    pub async fn select_branch(
        &self,
        owner: UserId,
        conv: ConversationId,
        message: MessageId,
    ) -> Result<Conversation> {
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "WITH RECURSIVE down(id, depth) AS ( \
               SELECT m.id, 0 FROM messages m JOIN conversations c ON c.id = m.conversation_id \
               WHERE m.id = ? AND m.conversation_id = ? AND c.owner_id = ? \
               UNION ALL SELECT k.id, down.depth + 1 FROM down JOIN messages k ON k.parent_id = down.id \
               WHERE k.id = (SELECT n.id FROM messages n WHERE n.parent_id = down.id \
                             ORDER BY n.created_at DESC, n.rowid DESC LIMIT 1)) \
             UPDATE conversations SET current_leaf_id = \
               (SELECT id FROM down ORDER BY depth DESC LIMIT 1) \
             WHERE id = ? AND owner_id = ? AND EXISTS (SELECT 1 FROM down)",
        )
        .bind(message.to_string())
        .bind(conv.to_string())
        .bind(owner.to_string())
        .bind(conv.to_string())
        .bind(owner.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        self.conversation(owner, conv).await
    }

    /// Marks a conversation's streaming messages interrupted (its session actor failed).
    pub async fn interrupt_streaming(&self, conv: ConversationId) -> Result<u64> {
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "UPDATE messages SET status = 'interrupted', updated_at = ? WHERE conversation_id = ? AND status = 'streaming'",
        )
        .bind(now_ms())
        .bind(conv.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    /// Full-text search over one's own messages.
    pub async fn search(&self, owner: UserId, q: &str) -> Result<Vec<SearchHit>> {
        check_text("the query", q, 1000)?;
        let Some(query) = fts_query(q) else {
            return Ok(vec![]);
        };
        let rows = sqlx::query(
            "SELECT m.id, m.conversation_id, c.title, snippet(messages_fts, 0, '', '', '…', 12) AS snippet \
             FROM messages_fts JOIN messages m ON m.rowid = messages_fts.rowid \
             JOIN conversations c ON c.id = m.conversation_id \
             WHERE messages_fts MATCH ? AND c.owner_id = ? ORDER BY rank LIMIT 50",
        )
        .bind(query)
        .bind(owner.to_string())
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SearchHit {
                    message_id: parse(r.get("id"))?,
                    conversation_id: parse(r.get("conversation_id"))?,
                    title: r.get("title"),
                    snippet: r.get("snippet"),
                })
            })
            .collect()
    }
}
