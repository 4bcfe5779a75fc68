"""Networking shared by the receiver and the sender: socket tuning, bounds on
what a peer's PDUs may cost, rate-limited refusal logs, and the one module
that touches pynetdicom's internals (``pynetdicom_compat``)."""
