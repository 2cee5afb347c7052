-- create-admin --promote signs an existing account out everywhere before it becomes an admin
-- (whoever signed the address up first may hold its sessions).
ALTER TABLE refresh_families DROP CONSTRAINT refresh_families_revoke_reason_check;
ALTER TABLE refresh_families ADD CONSTRAINT refresh_families_revoke_reason_check
    CHECK (revoke_reason IN ('LOGOUT', 'REUSE', 'PROMOTED'));
