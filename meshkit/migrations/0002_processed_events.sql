-- Consumer de-duplication (meshkit.consumer): the consumer inserts (consumer_group, event_id) in the
-- same transaction as the handler's effect; a second delivery of the event finds the row and is
-- skipped, so the effect happens exactly once per consumer group.
CREATE TABLE processed_events (
    consumer_group text        NOT NULL,
    event_id       uuid        NOT NULL,
    topic          text        NOT NULL,
    "partition"    integer     NOT NULL,
    "offset"       bigint      NOT NULL,
    processed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, event_id)
);

CREATE INDEX processed_events_processed_at_idx ON processed_events (processed_at);
