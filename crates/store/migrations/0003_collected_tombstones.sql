-- Migration 3: per (owner, model), the newest version of a deletion this device may no longer
-- remember (crate watermark): raised when tombstones are collected, and when a backfill or a
-- comparison copies rows from a peer that had collected some. Sent in watermarks as
-- `collected`: a peer whose mark is lower cannot catch up from this device by version alone.
CREATE TABLE sync_collected_state (
    owner BLOB NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (owner, model)
) WITHOUT ROWID;
