-- When an event stops selling (its sale close time, or its show's start), from EventPublished:
-- booking refuses new holds and orders from then on. NULL for events written before this column,
-- which are not closed (their EventPublished is not read again).
ALTER TABLE events ADD COLUMN sales_end timestamptz;
