"""svc_booking: seat inventory, holds and orders."""
