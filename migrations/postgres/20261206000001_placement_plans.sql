-- Placement plans that do not depend on the statistics of the moment.
--
-- PL/pgSQL keeps a statement's plan for the life of the connection, and
-- `place_batch` forces generic plans. A pool connection that first placed
-- an order while `orders` was empty (a new deployment, a new test or bench
-- database) planned the count of the customers' unpaid orders as a scan of
-- `orders_pending_deadline` (every unpaid order) filtered by customer, or as
-- a sequential scan once `orders` had been vacuumed empty, and kept that
-- plan while the table grew: each batch then read every unpaid order in the
-- database. Measured at createOrder c16: Postgres spent 600-700 us of CPU
-- per order, 4x the third session's figure, most of it in that filter.
--
-- So the count is one index lookup per distinct customer (a LATERAL
-- aggregate, which the planner cannot turn into a scan of the whole table)
-- whose only index condition is the customer: the deadline is a FILTER of
-- the aggregates, not a WHERE condition, because on an empty table a scan
-- of `orders_pending_deadline` from the deadline on costs the same as the
-- customer's own index and was picked about one time in four. Both
-- functions also plan with `enable_seqscan = off`: with no row counted yet,
-- a sequential scan looks free; an index scan is never much worse.

CREATE OR REPLACE FUNCTION lock_pending(customer bigint, at timestamptz)
RETURNS TABLE (n bigint, units bigint, first_expiry timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off
AS $fn$
BEGIN
    PERFORM 1 FROM customers c WHERE c.id = customer FOR NO KEY UPDATE;
    RETURN QUERY
    SELECT count(*) FILTER (WHERE o.expires_at > at),
           coalesce(sum(u.q) FILTER (WHERE o.expires_at > at), 0)::bigint,
           min(o.expires_at) FILTER (WHERE o.expires_at > at)
      FROM orders o
      LEFT JOIN LATERAL (SELECT sum(l.quantity) AS q FROM order_lines l WHERE l.order_id = o.id) u ON true
     WHERE o.customer_id = customer AND o.status = 'PENDING_PAYMENT';
END
$fn$;

CREATE OR REPLACE FUNCTION place_batch(
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
) RETURNS TABLE (r_order int, r_id bigint, r_stock int[], r_price int[], r_currency text[],
                 r_pending bigint, r_units bigint, r_first_expiry timestamptz)
LANGUAGE plpgsql
-- The statements below take arrays as parameters, so custom plans look
-- cheaper to the plan cache and every call would plan them again; their
-- generic plans are the same.
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $fn$
DECLARE
    -- the batch's products as locked: parallel arrays sorted by id
    p_id bigint[];
    p_stock int[];
    p_price int[];
    p_cur text[];
    -- where each line's product is in p_* (NULL: no such product)
    pos int[];
    -- the batch's customers: unpaid orders, units, earliest deadline
    c_id bigint[];
    c_n bigint[];
    c_units bigint[];
    c_first timestamptz[];
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
    ok boolean;
    total bigint;
    units bigint;
    k int;
    i int;
    j int;
BEGIN
    PERFORM 1 FROM customers c WHERE c.id = ANY (o_customer) ORDER BY c.id FOR NO KEY UPDATE;
    -- one index lookup per customer (see the top of this file)
    SELECT coalesce(array_agg(c.id), '{}'), coalesce(array_agg(s.n), '{}'), coalesce(array_agg(s.units), '{}'),
           coalesce(array_agg(s.first_expiry), '{}')
      INTO c_id, c_n, c_units, c_first
      FROM (SELECT DISTINCT unnest(o_customer) AS id) c
     CROSS JOIN LATERAL (
           SELECT count(*) FILTER (WHERE o.expires_at > o_created[1]) AS n,
                  coalesce(sum(u.q) FILTER (WHERE o.expires_at > o_created[1]), 0)::bigint AS units,
                  min(o.expires_at) FILTER (WHERE o.expires_at > o_created[1]) AS first_expiry
             FROM orders o
             LEFT JOIN LATERAL (SELECT sum(l.quantity) AS q FROM order_lines l WHERE l.order_id = o.id) u ON true
            WHERE o.customer_id = c.id AND o.status = 'PENDING_PAYMENT') s
     WHERE s.n > 0;

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
        k := array_position(c_id, o_customer[i]);
        IF k IS NULL THEN
            c_id := c_id || o_customer[i];
            c_n := c_n || 0::bigint;
            c_units := c_units || 0::bigint;
            c_first := c_first || NULL::timestamptz;
            k := cardinality(c_id);
        END IF;
        r_order := i;
        r_id := NULL;
        r_stock := '{}';
        r_price := '{}';
        r_currency := '{}';
        r_pending := c_n[k];
        r_units := c_units[k];
        r_first_expiry := c_first[k];

        -- the facts, and the write's condition on them: every product
        -- exists with the stock, one currency, the total and the limits
        ok := true;
        total := 0;
        units := 0;
        FOR j IN first_line .. last_line LOOP
            r_stock := r_stock || p_stock[pos[j]];
            r_price := r_price || p_price[pos[j]];
            r_currency := r_currency || p_cur[pos[j]];
            ok := ok AND coalesce(p_stock[pos[j]] >= l_qty[j] AND p_cur[pos[j]] = p_cur[pos[first_line]], false);
            total := total + coalesce(p_price[pos[j]]::bigint * l_qty[j], 0);
            units := units + l_qty[j];
        END LOOP;
        ok := ok AND total <= max_total AND c_n[k] < max_orders AND c_units[k] + units <= max_units;

        IF ok THEN
            r_id := nextval('orders_id_seq');
            FOR j IN first_line .. last_line LOOP
                p_stock[pos[j]] := p_stock[pos[j]] - l_qty[j];
                wl_order := wl_order || r_id;
                wl_product := wl_product || l_product[j];
                wl_qty := wl_qty || l_qty[j];
                wl_price := wl_price || p_price[pos[j]];
            END LOOP;
            w_id := w_id || r_id;
            w_order := w_order || i;
            w_total := w_total || total;
            w_cur := w_cur || p_cur[pos[first_line]];
            c_n[k] := c_n[k] + 1;
            c_units[k] := c_units[k] + units;
            c_first[k] := least(c_first[k], o_expires[i]);
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
