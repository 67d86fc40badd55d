-- smolchat schema, version 1.
-- Ids are UUID strings. Times are milliseconds since the Unix epoch.

CREATE TABLE users (
    id          TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL
);

-- Login sessions: only the SHA-256 of each token is kept.
CREATE TABLE login_sessions (
    token_hash  TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL
);

CREATE TABLE conversations (
    id              TEXT PRIMARY KEY,
    owner_id        TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    title           TEXT NOT NULL DEFAULT '',
    system_prompt   TEXT NOT NULL DEFAULT '',
    -- Generation settings as JSON (temperature, top_p, max_tokens, ...).
    settings        TEXT NOT NULL DEFAULT '{}',
    reasoning       INTEGER NOT NULL DEFAULT 0,
    -- What to do when the history no longer fits the context.
    overflow_policy TEXT NOT NULL DEFAULT 'refuse' CHECK (overflow_policy IN ('refuse', 'drop_oldest')),
    -- The leaf of the branch the user is looking at.
    current_leaf_id TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX conversations_by_owner ON conversations(owner_id, updated_at DESC);

-- Messages form a tree per conversation: regenerate and edit add siblings.
CREATE TABLE messages (
    id                TEXT PRIMARY KEY,
    conversation_id   TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id         TEXT REFERENCES messages(id) ON DELETE CASCADE,
    role              TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content           TEXT NOT NULL,
    reasoning         TEXT NOT NULL DEFAULT '',
    status            TEXT NOT NULL CHECK (status IN ('streaming', 'complete', 'interrupted', 'error')),
    finish_reason     TEXT,
    error             TEXT,
    prompt_tokens     INTEGER,
    cached_tokens     INTEGER,
    completion_tokens INTEGER,
    ttft_ms           REAL,
    tokens_per_second REAL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);
CREATE INDEX messages_by_conversation ON messages(conversation_id, created_at);
CREATE INDEX messages_by_parent ON messages(parent_id);
CREATE INDEX messages_streaming ON messages(status) WHERE status = 'streaming';

-- Full-text search over message contents (external content: the messages table).
CREATE VIRTUAL TABLE messages_fts USING fts5(content, content = 'messages', content_rowid = 'rowid');
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, content) VALUES (new.rowid, new.content);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content);
    INSERT INTO messages_fts(rowid, content) VALUES (new.rowid, new.content);
END;
