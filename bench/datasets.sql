-- The benchmark's datasets, made by PostgreSQL itself. psql variables: rows (the ~200-byte
-- table, bench_narrow), wide_rows (the ~2 KB table, bench_wide), lat_rows (bench_lat, which
-- the latency load updates). Used by bench/run.sh and bench/compare.sh on an empty database.
\set ON_ERROR_STOP on

-- One function makes the ~200-byte rows (as COPY text: ~215 bytes) of both tables:
-- bigint key, int, text, numeric, text, timestamptz, jsonb.
CREATE FUNCTION bench_rows(total bigint)
RETURNS TABLE (id bigint, n int, name text, amount numeric(12,2), note text,
               created timestamptz, doc jsonb)
LANGUAGE sql AS $$
  SELECT i, (i % 1000)::int, 'customer-' || md5(i::text),
         round((random() * 10000)::numeric, 2),
         md5((i * 7)::text) || md5((i * 13)::text),
         timestamptz '2024-01-01 00:00:00+00' + i * interval '1 second',
         jsonb_build_object('sku', 'SKU-' || (i % 5000), 'qty', i % 7,
                            'tags', jsonb_build_array('red', 'blue'), 'gift', i % 2 = 0)
    FROM generate_series(1, total) AS i
$$;

CREATE TABLE bench_narrow (id bigint PRIMARY KEY, n int NOT NULL, name text NOT NULL,
  amount numeric(12,2) NOT NULL, note text, created timestamptz NOT NULL, doc jsonb NOT NULL);
INSERT INTO bench_narrow SELECT * FROM bench_rows(:rows);

-- The wide variant adds eight 224-character text columns (~2 KB per row). PLAIN storage keeps
-- them in the row: this measures row width, not TOAST.
CREATE TABLE bench_wide (LIKE bench_narrow INCLUDING ALL,
  w1 text, w2 text, w3 text, w4 text, w5 text, w6 text, w7 text, w8 text);
ALTER TABLE bench_wide ALTER w1 SET STORAGE PLAIN, ALTER w2 SET STORAGE PLAIN,
  ALTER w3 SET STORAGE PLAIN, ALTER w4 SET STORAGE PLAIN, ALTER w5 SET STORAGE PLAIN,
  ALTER w6 SET STORAGE PLAIN, ALTER w7 SET STORAGE PLAIN, ALTER w8 SET STORAGE PLAIN;
INSERT INTO bench_wide
SELECT r.*, substr(h, 1, 224), substr(h, 225, 224), substr(h, 449, 224), substr(h, 673, 224),
       substr(h, 897, 224), substr(h, 1121, 224), substr(h, 1345, 224), substr(h, 1569, 224)
  FROM bench_rows(:wide_rows) AS r,
       LATERAL (SELECT string_agg(md5(r.id || '-' || k), '') AS h
                  FROM generate_series(1, 56) AS k) AS x;

-- The latency load updates its own table, so only its events reach the latency topic.
CREATE TABLE bench_lat AS SELECT * FROM bench_narrow WHERE id <= :lat_rows;
ALTER TABLE bench_lat ADD PRIMARY KEY (id);

CREATE PUBLICATION bench_narrow_pub FOR TABLE bench_narrow;
CREATE PUBLICATION bench_wide_pub FOR TABLE bench_wide;
CREATE PUBLICATION bench_lat_pub FOR TABLE bench_lat;

-- The small-transactions case: `rows_per_txn` rows per transaction, one COMMIT each.
CREATE PROCEDURE bench_small_txns(total bigint, rows_per_txn int)
LANGUAGE plpgsql AS $$
DECLARE lo bigint := 1;
BEGIN
  WHILE lo <= total LOOP
    UPDATE bench_narrow SET n = n + 1 WHERE id >= lo AND id < lo + rows_per_txn;
    COMMIT;
    lo := lo + rows_per_txn;
  END LOOP;
END $$;

VACUUM ANALYZE;
