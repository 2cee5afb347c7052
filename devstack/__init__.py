"""The local platform: install, start, watch and stop everything Ticketping needs on one machine."""
