-- The conversation list comes in pages, newest first, ties broken by id: with the id in the
-- index, a page seeks straight to its cursor instead of scanning from the newest.
DROP INDEX conversations_by_owner;
CREATE INDEX conversations_by_owner ON conversations(owner_id, updated_at DESC, id DESC);
