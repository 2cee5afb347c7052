"""svc_catalog: events, venues, seat maps and publishing."""
