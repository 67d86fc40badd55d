-- Keys the server makes once and keeps: `visitor` signs the tokens of anonymous visitors, who
-- get a user row only when they first store something (a page view stores nothing).
CREATE TABLE server_keys (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
