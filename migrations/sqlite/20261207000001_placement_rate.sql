-- ORDER_RATE_LIMIT counted by the placing transaction (see the Postgres
-- migration of the same name): the customer's current fixed window, when
-- it started (milliseconds since the epoch) and the placements attempted
-- in it, refused ones included.
ALTER TABLE customers ADD COLUMN placements_since INTEGER;
ALTER TABLE customers ADD COLUMN placements INTEGER NOT NULL DEFAULT 0;
