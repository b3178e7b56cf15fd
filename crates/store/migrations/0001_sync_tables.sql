-- lsync's bookkeeping, in the same file as the synced data so that a write and its change record
-- commit in one transaction. Every table is prefixed sync_; nothing else in the file is
-- device-local. Integers holding HLC times are the packed u64 (physical_ms << 16 | logical) stored
-- as a signed 64-bit integer: order-preserving until the year 6429.

-- Identity and small settings of this device's copy: library id, device id, epoch, clock.
CREATE TABLE sync_meta (
    key TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;

-- Peer log (crate peer-log): shared changes of every origin, own and received, until every
-- paired device has acknowledged them.
CREATE TABLE sync_peer_log (
    origin BLOB NOT NULL,
    seq INTEGER NOT NULL,
    time INTEGER NOT NULL,
    model TEXT NOT NULL,
    record BLOB NOT NULL,
    op INTEGER NOT NULL,
    fields BLOB,
    logged_at INTEGER NOT NULL,
    PRIMARY KEY (origin, seq)
) WITHOUT ROWID;

-- Shared data (crate shared-sync): the merged registers of every shared record, which the
-- shared tables are a projection of.
CREATE TABLE sync_shared_state (
    model TEXT NOT NULL,
    id BLOB NOT NULL,
    state BLOB NOT NULL,
    PRIMARY KEY (model, id)
) WITHOUT ROWID;

-- Which shared records reference which rows, to re-project them when a target appears or goes.
CREATE TABLE sync_shared_refs (
    target_model TEXT NOT NULL,
    target_id BLOB NOT NULL,
    model TEXT NOT NULL,
    id BLOB NOT NULL,
    PRIMARY KEY (target_model, target_id, model, id)
) WITHOUT ROWID;

-- Shared records that exist but are not shown because a referenced row is missing: waiting for
-- it to arrive (orphaned = 0), or hidden because it was deleted (orphaned = 1).
CREATE TABLE sync_parked (
    model TEXT NOT NULL,
    id BLOB NOT NULL,
    target_model TEXT NOT NULL,
    target_id BLOB NOT NULL,
    orphaned INTEGER NOT NULL,
    parked_at INTEGER NOT NULL,
    PRIMARY KEY (model, id)
) WITHOUT ROWID;

-- Device-owned deletions (crate state-sync). kind 0: the owner deleted the row; kind 1: the
-- owner deleted the row and its subtree; kind 2: a row removed locally because a subtree
-- tombstone covers it (never sent; kept so that ancestor chains stay walkable). parent is the
-- row's parent when it was removed, for trees.
CREATE TABLE sync_tombstones (
    model TEXT NOT NULL,
    id BLOB NOT NULL,
    owner BLOB NOT NULL,
    version INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    parent BLOB,
    deleted_at INTEGER NOT NULL,
    PRIMARY KEY (model, id)
) WITHOUT ROWID;
CREATE INDEX sync_tombstones_owner_version ON sync_tombstones (model, owner, version);

-- Watermarks (crate watermark): what this device has applied...
CREATE TABLE sync_progress_shared (
    origin BLOB PRIMARY KEY NOT NULL,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE sync_progress_state (
    owner BLOB NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (owner, model)
) WITHOUT ROWID;

-- ...which devices it is paired with...
CREATE TABLE sync_peers (
    device BLOB PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    epoch INTEGER,
    paired_at INTEGER NOT NULL,
    last_seen INTEGER,
    needs_resync INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- ...and what each of them has acknowledged.
CREATE TABLE sync_peer_acks_shared (
    peer BLOB NOT NULL,
    origin BLOB NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (peer, origin)
) WITHOUT ROWID;
CREATE TABLE sync_peer_acks_state (
    peer BLOB NOT NULL,
    owner BLOB NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (peer, owner, model)
) WITHOUT ROWID;
