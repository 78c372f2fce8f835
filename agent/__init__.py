"""pgmq-edge-agent: drives devices behind a VPN from a PGMQ queue and reports verified state."""

__version__ = "0.1.0"
