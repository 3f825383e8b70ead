"""The turbo KV-cache type names of this fork family, in the order reports list them.

Kept apart from :mod:`harness.reference.turbo` (their layouts, NumPy) so that the command line and the commands that
only read reports (diff, scorecard) start without importing NumPy.
"""
TURBO_TYPES: tuple[str, ...] = ("turbo2", "turbo3", "turbo4")
