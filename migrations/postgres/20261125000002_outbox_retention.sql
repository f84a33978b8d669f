-- Published events stay a little while, so that an instance whose Redis
-- subscription was away can read what it missed from here.
ALTER TABLE outbox ADD COLUMN published_at TIMESTAMPTZ;
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_created ON outbox (created_at);
