"""The embedded default backbone: built once from a synthetic source hospital, then cached.

The fast tests shrink the recipe (a few records and steps); the real recipe is built in the
`slow` test.
"""

from __future__ import annotations
