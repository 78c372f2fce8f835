"""pgmq-edge-agent: drives devices behind a VPN from a PGMQ queue and reports verified state."""

# The one source of the version (PEP 440). The Debian package spells a pre-release with ~
# (0.2.0.dev1 -> 0.2.0~dev1-1); tests/unit/test_version.py keeps the package, image and compose in step.
__version__ = "0.2.0.dev1"
