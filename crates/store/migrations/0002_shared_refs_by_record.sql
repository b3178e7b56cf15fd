-- Migration 2: the references a shared record holds, found by the record (shared-sync replaces
-- them whenever the record is projected). Without it, replacing them scanned every reference in
-- the library: a cost per write that grew with the number of records referencing rows (metadata
-- keys, tag assignments).
CREATE INDEX sync_shared_refs_by_record ON sync_shared_refs (model, id);
