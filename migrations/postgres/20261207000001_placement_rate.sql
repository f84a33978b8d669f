-- ORDER_RATE_LIMIT counted where the placement already locks the customer.
--
-- The limit was a Redis round trip ahead of every placement. Measured at
-- createOrder c16 on 2 cores, that round trip was a quarter of the server's
-- CPU per order, and the wait for it made the placement batches smaller, so
-- Postgres did more commits per order (260 vs 190 us of CPU per order).
-- The placing transaction locks the customer's row anyway (for the pending
-- limits); now it updates it: the customer's current fixed window (when it
-- started, how many placements were attempted in it). Every attempt that
-- reaches the placement counts, refused ones too, as the Redis counter did;
-- an idempotent replay is answered before and counts nothing. The count is
-- exact across instances and holds while Redis is away.
--
-- The functions get new names or signatures, so instances of the previous
-- release keep theirs during a rolling upgrade.

ALTER TABLE customers
    ADD COLUMN placements_since timestamptz,
    ADD COLUMN placements integer NOT NULL DEFAULT 0;

-- lock_pending, counting the attempt: also returns the attempts in the
-- window (this one included) and when the window ends. `placed` and
-- `window_ends` are NULL when the customer does not exist.
CREATE FUNCTION lock_counted(customer bigint, at timestamptz, rate_window interval)
RETURNS TABLE (n bigint, units bigint, first_expiry timestamptz, placed bigint, window_ends timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off
AS $fn$
DECLARE
    c_placed bigint;
    c_ends timestamptz;
BEGIN
    UPDATE customers c
       SET placements_since = CASE WHEN c.placements_since IS NULL OR c.placements_since + rate_window <= at
                                   THEN at ELSE c.placements_since END,
           placements = CASE WHEN c.placements_since IS NULL OR c.placements_since + rate_window <= at
                             THEN 1 ELSE c.placements + 1 END
     WHERE c.id = customer
    RETURNING c.placements, c.placements_since + rate_window INTO c_placed, c_ends;
    RETURN QUERY
    SELECT count(*) FILTER (WHERE o.expires_at > at),
           coalesce(sum(u.q) FILTER (WHERE o.expires_at > at), 0)::bigint,
           min(o.expires_at) FILTER (WHERE o.expires_at > at),
           c_placed,
           c_ends
      FROM orders o
      LEFT JOIN LATERAL (SELECT sum(l.quantity) AS q FROM order_lines l WHERE l.order_id = o.id) u ON true
     WHERE o.customer_id = customer AND o.status = 'PENDING_PAYMENT';
END
$fn$;

-- place_batch with the window: two more parameters (`max_placed`,
-- `rate_window`) and two more columns (`r_placed`, `r_window_ends`). An
-- order over the rate is refused before anything else is judged. The
-- window is judged at the batch's first creation time (the orders of a
-- batch were queued within milliseconds of each other).

CREATE FUNCTION place_batch(
    o_customer bigint[],
    o_created timestamptz[],
    o_expires timestamptz[],
    o_fingerprint text[],
    l_order int[],
    l_product bigint[],
    l_qty int[],
    max_total bigint,
    max_orders bigint,
    max_units bigint,
    max_placed bigint,
    rate_window interval
) RETURNS TABLE (r_order int, r_id bigint, r_stock int[], r_price int[], r_currency text[],
                 r_pending bigint, r_units bigint, r_first_expiry timestamptz,
                 r_placed bigint, r_window_ends timestamptz)
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
    -- the batch's customers' windows: attempts before this batch's, end
    h_id bigint[];
    h_placed bigint[];
    h_ends timestamptz[];
    h int;
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
    -- lock the customers in id order (as every placement does, so none
    -- deadlock) and count the batch's attempts in their windows
    WITH locked AS (
        SELECT c.id FROM customers c WHERE c.id = ANY (o_customer) ORDER BY c.id FOR NO KEY UPDATE
    ), attempts AS (
        SELECT a.id, count(*)::int AS k FROM unnest(o_customer) AS a(id) GROUP BY a.id
    ), counted AS (
        UPDATE customers c
           SET placements_since = CASE WHEN c.placements_since IS NULL
                                            OR c.placements_since + rate_window <= o_created[1]
                                       THEN o_created[1] ELSE c.placements_since END,
               placements = CASE WHEN c.placements_since IS NULL OR c.placements_since + rate_window <= o_created[1]
                                 THEN attempts.k ELSE c.placements + attempts.k END
          FROM locked JOIN attempts ON attempts.id = locked.id
         WHERE c.id = locked.id
        RETURNING c.id, (c.placements - attempts.k)::bigint AS placed_before, c.placements_since + rate_window AS ends
    )
    SELECT coalesce(array_agg(counted.id), '{}'), coalesce(array_agg(counted.placed_before), '{}'),
           coalesce(array_agg(counted.ends), '{}')
      INTO h_id, h_placed, h_ends
      FROM counted;
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
        h := array_position(h_id, o_customer[i]);
        r_placed := NULL;
        r_window_ends := NULL;
        IF h IS NOT NULL THEN
            h_placed[h] := h_placed[h] + 1;
            r_placed := h_placed[h];
            r_window_ends := h_ends[h];
        END IF;

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
        ok := ok AND total <= max_total AND c_n[k] < max_orders AND c_units[k] + units <= max_units
              AND coalesce(r_placed, 0) <= max_placed;

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
