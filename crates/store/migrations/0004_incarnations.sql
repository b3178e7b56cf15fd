-- Migration 4: this device's incarnations. Every time the library is opened, the device numbers
-- its shared changes under a new origin id (an incarnation), so that a copy restored from a
-- backup, even one that cannot tell it was restored, never gives a sequence number its peers
-- already hold for another change. This table lists the incarnations this file knows to be its
-- own (a peer holding more of one of them than this file does shows that it was rolled back).
CREATE TABLE sync_incarnations (
    origin BLOB PRIMARY KEY NOT NULL,
    opened_at INTEGER NOT NULL
) WITHOUT ROWID;
