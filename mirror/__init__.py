"""HTTP-aware selective traffic mirror: a tc BPF classifier that clones every packet of
HTTP error connections to a debug interface, and the controller that runs it."""

__version__ = "0.1.0"
