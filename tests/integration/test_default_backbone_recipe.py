"""The embedded default backbone built with the real recipe (minutes of pre-training). The
shrunk recipe and the cache: tests/unit/test_default_backbone.py."""

from __future__ import annotations
