"""svc_identity: users, credentials, sessions and the signing keys of user tokens."""
