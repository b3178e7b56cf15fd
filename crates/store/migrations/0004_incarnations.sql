-- Migration 4: this device's incarnations, and what each peer last told of its own.
--
-- Every time the library is opened, the device numbers its shared changes under a new origin id
-- (an incarnation), so that a copy restored from a backup, even one that cannot tell it was
-- restored, never gives a sequence number its peers already hold for another change. This table
-- lists the incarnations this file knows to be its own, each with the write count
-- (`sync_meta` generation) the file had when it ended (NULL: the current one).
CREATE TABLE sync_incarnations (
    origin BLOB PRIMARY KEY NOT NULL,
    opened_at INTEGER NOT NULL,
    last_generation INTEGER
) WITHOUT ROWID;

-- The incarnation and write count each paired device last announced (in a watermark request):
-- told back to it, so that a copy rolled back to an old file learns it from any peer that saw
-- more of it than the file holds.
ALTER TABLE sync_peers ADD COLUMN seen_origin BLOB;
ALTER TABLE sync_peers ADD COLUMN seen_generation INTEGER;
