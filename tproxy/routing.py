"""Choosing the route for a request: by path prefix and, where a route asks, by model."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from tproxy.config import RouteSettings


def needs_model(routes: Sequence[RouteSettings]) -> bool:
    """True when some route matches on the body's model, so the body must be looked at (its
    ``model``, read by :class:`tproxy.core.body.RequestBody` in the one parse of the body)."""
    return any(route.models for route in routes)


def choose_route(
    routes: Sequence[RouteSettings], path: str, model: str | None
) -> RouteSettings | None:
    """The first route whose prefix matches ``path`` and whose model patterns admit ``model``.

    Routes are tried in the order the configuration lists them; None means no route matches.
    """
    for route in routes:
        if not path.startswith(route.path_prefix):
            continue
        if route.models and (
            model is None or not any(fnmatchcase(model, pattern) for pattern in route.models)
        ):
            continue
        return route
    return None
