-- A streaming answer is checkpointed every ~0.5 s; re-indexing its whole text each time made the
-- search index's work grow with the square of the answer's length, on the one writer
-- connection. Index a message once it stops streaming (complete, interrupted, error).
DROP TRIGGER messages_fts_insert;
DROP TRIGGER messages_fts_delete;
DROP TRIGGER messages_fts_update;
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages WHEN new.status != 'streaming' BEGIN
    INSERT INTO messages_fts(rowid, content) VALUES (new.rowid, new.content);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages WHEN old.status != 'streaming' BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE OF content, status ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content)
        SELECT 'delete', old.rowid, old.content WHERE old.status != 'streaming';
    INSERT INTO messages_fts(rowid, content)
        SELECT new.rowid, new.content WHERE new.status != 'streaming';
END;
-- Messages left streaming by the old triggers are in the index: take them out, so that the
-- index holds exactly the rows the new triggers expect.
INSERT INTO messages_fts(messages_fts, rowid, content)
    SELECT 'delete', rowid, content FROM messages WHERE status = 'streaming';
