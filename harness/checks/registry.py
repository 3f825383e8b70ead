"""The registry of the checks in ``harness/checks/``: built once at import, read by everything, never written.

A module of ``harness/checks/`` that defines ``CHECK = Check(...)`` (:class:`harness.checks.contract.Check`) is
registered; nothing else needs to name it. Check modules must not import this module (it imports them).
"""
from __future__ import annotations

from harness.checks.contract import Registry

REGISTRY: Registry = Registry.discover()


def default_registry() -> Registry:
    """The registry of the checks in ``harness/checks/`` (:data:`REGISTRY`)."""
    return REGISTRY
