-- Where each node's internal listener is reached (see the Postgres migration).
ALTER TABLE node_leases
    ADD COLUMN internal_addr TEXT NOT NULL DEFAULT '' CHECK (length(internal_addr) <= 256);
