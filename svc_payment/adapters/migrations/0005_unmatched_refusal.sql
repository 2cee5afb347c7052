-- A refund the provider refused (it answered no, which asking again does not change): the
-- unmatched capture is left to an operator, and the sweep stops asking for it on every pass.
ALTER TABLE unmatched_callbacks ADD COLUMN refusal text NOT NULL DEFAULT '';
