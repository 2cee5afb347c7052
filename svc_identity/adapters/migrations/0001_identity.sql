-- svc_identity's schema: users, refresh-token families, and the keys that sign user tokens.

CREATE TABLE users (
    id            uuid        PRIMARY KEY,
    email         text        NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    display_name  text        NOT NULL,
    role          text        NOT NULL DEFAULT 'USER' CHECK (role IN ('USER', 'ADMIN')),
    password_hash text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
-- One account per address, compared case-insensitively: enforced here, not only in code.
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));

-- One family per login; every refresh spends a token and adds the next one to the family.
CREATE TABLE refresh_families (
    id            uuid        PRIMARY KEY,
    user_id       uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    revoke_reason text        CHECK (revoke_reason IN ('LOGOUT', 'REUSE'))
);
CREATE INDEX refresh_families_user_idx ON refresh_families (user_id);

-- Only the SHA-256 of a token is stored; the token itself is never written anywhere.
CREATE TABLE refresh_tokens (
    token_hash bytea       PRIMARY KEY CHECK (length(token_hash) = 32),
    family_id  uuid        NOT NULL REFERENCES refresh_families (id) ON DELETE CASCADE,
    issued_at  timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz,            -- spent by a refresh (presenting it again is reuse)
    revoked_at timestamptz             -- its family was revoked
);
CREATE INDEX refresh_tokens_family_idx ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_expires_idx ON refresh_tokens (expires_at);

-- ES256 (P-256) signing keys. private_key: PKCS#8 PEM, AES-256-GCM encrypted with the
-- key-encryption key (TP_KEY_ENCRYPTION_KEY; nonce || ciphertext, the kid as associated data)
-- when encryption = 'aes256gcm', plain when 'none'.
CREATE TABLE signing_keys (
    kid          text        PRIMARY KEY,
    state        text        NOT NULL CHECK (state IN ('next', 'current', 'retired')),
    private_key  bytea       NOT NULL,
    encryption   text        NOT NULL CHECK (encryption IN ('none', 'aes256gcm')),
    public_jwk   jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    activated_at timestamptz,
    retired_at   timestamptz,
    CHECK ((state = 'retired') = (retired_at IS NOT NULL)),
    CHECK (state = 'next' OR activated_at IS NOT NULL)
);
-- At most one current and one next key.
CREATE UNIQUE INDEX signing_keys_one_current ON signing_keys ((true)) WHERE state = 'current';
CREATE UNIQUE INDEX signing_keys_one_next ON signing_keys ((true)) WHERE state = 'next';
