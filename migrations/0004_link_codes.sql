-- One-time codes that sign another browser in as the same user: one device shows a link, the
-- other opens it. Only a code's hash is kept, and a code lasts ten minutes.
CREATE TABLE link_codes (
    code_hash  TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires_at INTEGER NOT NULL
);
