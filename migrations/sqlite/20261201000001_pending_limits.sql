-- MAX_PENDING_ORDERS / MAX_PENDING_UNITS: each placement counts the
-- customer's unpaid orders; this index keeps that count to those orders.
CREATE INDEX orders_customer_pending ON orders (customer_id, expires_at) WHERE status = 'PENDING_PAYMENT';
