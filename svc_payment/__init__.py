"""svc_payment: payments, the provider adapter and its webhook."""
