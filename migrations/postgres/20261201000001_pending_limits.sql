-- MAX_PENDING_ORDERS / MAX_PENDING_UNITS, decided inside the placement.
--
-- A placement first locks its customer's row (FOR NO KEY UPDATE: placements
-- of one customer queue behind each other; inserting orders, which takes
-- FOR KEY SHARE for the foreign key, is not blocked) and only then counts
-- that customer's unpaid orders, in a statement of its own, so in a snapshot
-- taken after the lock: two concurrent placements at the limit cannot both
-- see room. Customers are locked before products, in id order, everywhere
-- (single statement and batches), so placements cannot deadlock.
-- "Unpaid" is PENDING_PAYMENT with a deadline still ahead: an order past its
-- deadline can no longer be paid and is being cancelled.

CREATE INDEX orders_customer_pending ON orders (customer_id, expires_at) WHERE status = 'PENDING_PAYMENT';

-- Locks the customer, then answers how many unpaid orders it holds, their
-- units, and the earliest deadline among them. VOLATILE (the default), so
-- its query takes a fresh snapshot even when called from a larger statement.
CREATE FUNCTION lock_pending(customer bigint, at timestamptz)
RETURNS TABLE (n bigint, units bigint, first_expiry timestamptz)
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM 1 FROM customers c WHERE c.id = customer FOR NO KEY UPDATE;
    RETURN QUERY
    SELECT count(*), coalesce(sum(u.q), 0)::bigint, min(o.expires_at)
      FROM orders o
      LEFT JOIN LATERAL (SELECT sum(l.quantity) AS q FROM order_lines l WHERE l.order_id = o.id) u ON true
     WHERE o.customer_id = customer AND o.status = 'PENDING_PAYMENT' AND o.expires_at > at;
END
$fn$;

-- place_orders with the pending limits: the same batch placement as
-- `place_orders` (kept for instances of the previous release during a
-- rolling upgrade), plus `max_orders`, `max_units` and two more refusals,
-- `TOO_MANY_PENDING` and `TOO_MANY_UNITS`, checked after the others. A
-- refused row also carries `r_free_at` (the customer's earliest unpaid
-- deadline) and `r_units` (the unpaid units the order would have made).

CREATE FUNCTION place_orders_limited(
    o_customer bigint[],
    o_created timestamptz[],
    o_expires timestamptz[],
    o_fingerprint text[],
    l_order int[],
    l_product bigint[],
    l_qty int[],
    max_total bigint,
    max_orders bigint,
    max_units bigint
) RETURNS TABLE (r_order int, r_id bigint, r_currency text, r_prices int[], r_refusal text, r_product bigint,
                 r_free_at timestamptz, r_units bigint)
LANGUAGE plpgsql
-- The statements below take arrays as parameters, so custom plans look
-- cheaper to the plan cache and every call would plan them again (a fifth
-- of the function's time when measured); their generic plans are the same.
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    -- the batch's products as locked: parallel arrays sorted by id
    p_id bigint[];
    p_stock int[];
    p_price int[];
    p_cur text[];
    -- where each line's product is in p_*
    pos int[];
    -- what to write, for the orders that pass
    w_id bigint[] := '{}';
    w_order int[] := '{}';
    w_total bigint[] := '{}';
    w_cur text[] := '{}';
    wl_order bigint[] := '{}';
    wl_product bigint[] := '{}';
    wl_qty int[] := '{}';
    wl_price int[] := '{}';
    first_line int := 1;
    last_line int;
    n_lines int := cardinality(l_order);
    total bigint;
    -- the batch's customers: unpaid orders, units, earliest deadline
    c_id bigint[];
    c_n bigint[];
    c_units bigint[];
    c_first timestamptz[];
    k int;
    units bigint;
    i int;
    j int;
BEGIN
    -- The customers first, in id order (see the top of this file), then
    -- their unpaid orders counted in a snapshot taken after those locks.
    PERFORM 1 FROM customers c WHERE c.id = ANY (o_customer) ORDER BY c.id FOR NO KEY UPDATE;
    SELECT coalesce(array_agg(s.id), '{}'), coalesce(array_agg(s.n), '{}'), coalesce(array_agg(s.units), '{}'),
           coalesce(array_agg(s.first_expiry), '{}')
      INTO c_id, c_n, c_units, c_first
      FROM (SELECT o.customer_id AS id, count(*) AS n, coalesce(sum(u.q), 0)::bigint AS units,
                   min(o.expires_at) AS first_expiry
              FROM orders o
              LEFT JOIN LATERAL (SELECT sum(l.quantity) AS q FROM order_lines l WHERE l.order_id = o.id) u ON true
             WHERE o.customer_id = ANY (o_customer) AND o.status = 'PENDING_PAYMENT' AND o.expires_at > o_created[1]
             GROUP BY o.customer_id) s;

    -- Every product of the batch is locked once, in product-id order, before
    -- any stock is taken: the order in which the single-order statement and
    -- the cancellations (`finish_cancel`) lock products too, so that none of
    -- them can deadlock with another.
    SELECT array_agg(s.id), array_agg(s.stock), array_agg(s.price_cents), array_agg(s.currency)
      INTO p_id, p_stock, p_price, p_cur
      FROM (SELECT p.id, p.stock, p.price_cents, p.currency
              FROM products p
             WHERE p.id = ANY (l_product)
             ORDER BY p.id
               FOR UPDATE) s;

    FOR j IN 1 .. n_lines LOOP
        pos[j] := array_position(p_id, l_product[j]);
    END LOOP;

    FOR i IN 1 .. cardinality(o_customer) LOOP
        last_line := first_line;
        WHILE last_line < n_lines AND l_order[last_line + 1] = i LOOP
            last_line := last_line + 1;
        END LOOP;
        r_order := i;
        r_id := NULL;
        r_currency := NULL;
        r_prices := NULL;
        r_refusal := NULL;
        r_product := NULL;
        r_free_at := NULL;
        r_units := NULL;
        -- the same checks, in the same order, as the single-order path
        FOR j IN first_line .. last_line LOOP
            IF pos[j] IS NULL THEN
                r_refusal := 'UNKNOWN_PRODUCT';
                r_product := l_product[j];
                EXIT;
            END IF;
        END LOOP;
        IF r_refusal IS NULL THEN
            FOR j IN first_line .. last_line LOOP
                IF p_stock[pos[j]] < l_qty[j] THEN
                    r_refusal := 'INSUFFICIENT_STOCK';
                    r_product := l_product[j];
                    EXIT;
                END IF;
            END LOOP;
        END IF;
        IF r_refusal IS NULL THEN
            r_currency := p_cur[pos[first_line]];
            total := 0;
            FOR j IN first_line .. last_line LOOP
                IF p_cur[pos[j]] <> r_currency THEN
                    r_refusal := 'MIXED_CURRENCIES';
                    EXIT;
                END IF;
                total := total + p_price[pos[j]]::bigint * l_qty[j];
            END LOOP;
            IF r_refusal IS NULL AND total > max_total THEN
                r_refusal := 'TOTAL_TOO_LARGE';
            END IF;
        END IF;
        IF r_refusal IS NULL THEN
            k := array_position(c_id, o_customer[i]);
            IF k IS NULL THEN
                c_id := c_id || o_customer[i];
                c_n := c_n || 0::bigint;
                c_units := c_units || 0::bigint;
                c_first := c_first || NULL::timestamptz;
                k := cardinality(c_id);
            END IF;
            units := 0;
            FOR j IN first_line .. last_line LOOP
                units := units + l_qty[j];
            END LOOP;
            IF c_n[k] >= max_orders THEN
                r_refusal := 'TOO_MANY_PENDING';
            ELSIF c_units[k] + units > max_units THEN
                r_refusal := 'TOO_MANY_UNITS';
            END IF;
            IF r_refusal IS NOT NULL THEN
                r_free_at := c_first[k];
                r_units := c_units[k] + units;
            ELSE
                c_n[k] := c_n[k] + 1;
                c_units[k] := c_units[k] + units;
                c_first[k] := least(c_first[k], o_expires[i]);
            END IF;
        END IF;

        IF r_refusal IS NULL THEN
            r_id := nextval('orders_id_seq');
            r_prices := '{}';
            FOR j IN first_line .. last_line LOOP
                p_stock[pos[j]] := p_stock[pos[j]] - l_qty[j];
                r_prices := r_prices || p_price[pos[j]];
                wl_order := wl_order || r_id;
                wl_product := wl_product || l_product[j];
                wl_qty := wl_qty || l_qty[j];
                wl_price := wl_price || p_price[pos[j]];
            END LOOP;
            w_id := w_id || r_id;
            w_order := w_order || i;
            w_total := w_total || total;
            w_cur := w_cur || r_currency;
        ELSE
            r_currency := NULL;
        END IF;
        RETURN NEXT;
        first_line := last_line + 1;
    END LOOP;

    -- one statement for every write: one executor start-up, not three
    IF cardinality(w_id) > 0 THEN
        WITH taken AS (
            UPDATE products p SET stock = s.stock
              FROM unnest(p_id, p_stock) AS s(id, stock)
             WHERE p.id = s.id AND p.stock <> s.stock
        ), placed AS (
            INSERT INTO orders (id, customer_id, status, total_cents, currency, created_at, expires_at, fingerprint)
            SELECT w.id, o_customer[w.i], 'PENDING_PAYMENT', w.total, w.cur, o_created[w.i], o_expires[w.i],
                   o_fingerprint[w.i]
              FROM unnest(w_id, w_order, w_total, w_cur) AS w(id, i, total, cur)
        )
        INSERT INTO order_lines (order_id, product_id, quantity, unit_price_cents)
        SELECT * FROM unnest(wl_order, wl_product, wl_qty, wl_price);
    END IF;
END
$fn$;
