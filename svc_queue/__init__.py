"""svc_queue: one waiting room per event: arrivals, admission, sessions."""
