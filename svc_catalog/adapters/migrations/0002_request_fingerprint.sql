-- What a CreateEvent request asked for (a digest of its event and event id), beside its
-- request_id: a retry with the same id and the same request finds the first event; the same id
-- with another request is refused (REQUEST_ID_REUSED), as booking and payment refuse theirs,
-- instead of answering with an event the caller did not ask for. NULL on events made before.
ALTER TABLE events ADD COLUMN request_fingerprint bytea;
