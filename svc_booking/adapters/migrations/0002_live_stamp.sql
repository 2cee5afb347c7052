-- Which build of an event's live state in Redis is current: every build writes a new stamp here
-- and in {inv:<event>}:meta, in one transaction that holds the event's row FOR UPDATE. A hold is
-- written down only if the state its Redis script ran on carries the stamp read here (under FOR
-- KEY SHARE): a hold whose Redis state was lost and rebuilt meanwhile is retried, never kept on
-- seats the new state shows AVAILABLE. '' is the stamp of states built before this column.
ALTER TABLE events ADD COLUMN live_stamp text NOT NULL DEFAULT '';
