"""Live migration: the wire protocol (protocol.py), transports (transport.py), the sending worker
(source.py), the receiver state machine (destination.py) and progress reporting (progress.py)."""
