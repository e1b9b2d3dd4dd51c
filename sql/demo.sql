-- The demo schema: a small shop. Loaded by scripts/demo.sh into the `pgcdc_demo` database, and
-- by docker-compose.yml into the `shop` database when the PostgreSQL container is first created.
DROP TABLE IF EXISTS public.order_lines, public.orders, public.customers;

CREATE TABLE public.customers (
    id         bigint PRIMARY KEY,
    name       text NOT NULL,
    email      text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE public.orders (
    id          bigint PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES public.customers (id),
    status      text NOT NULL,
    total       numeric(12, 2) NOT NULL,
    details     jsonb NOT NULL DEFAULT '{}'
);

INSERT INTO public.customers (id, name, email) VALUES
    (1, 'Ada Lovelace', 'ada@example.com'),
    (2, 'Grace Hopper', 'grace@example.com'),
    (3, 'Edsger Dijkstra', NULL);

INSERT INTO public.orders (id, customer_id, status, total, details) VALUES
    (100, 1, 'paid', 19.90, '{"items": 2}'),
    (101, 2, 'new', 5.00, '{"items": 1, "gift": true}');
