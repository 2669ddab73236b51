-- Each node publishes where its internal listener (mutual TLS) is reached, so other
-- nodes of the region call it for relay control. '' = not published (a node of an
-- older version); peers then have no internal address for it.
ALTER TABLE node_leases
    ADD COLUMN internal_addr TEXT NOT NULL DEFAULT '' CHECK (length(internal_addr) <= 256);
