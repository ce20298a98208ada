"""Flights of upstream answers to clients: the only place that spawns per-request work.

One module per task of a flight (see docs/architecture.md, "The pipeline package"):

- :mod:`~tproxy.pipeline.request`: what the app hands in (``ProxyRequest``, ``CachePlan``) and
  gets back (``CacheReport``);
- :mod:`~tproxy.pipeline.reader`: the upstream reader (attempts, retries, relaying);
- :mod:`~tproxy.pipeline.live`: one flight's I/O, performing what the sans-IO fan-out
  (:mod:`tproxy.core.fanout`) decides;
- :mod:`~tproxy.pipeline.clientwriter`: one client's answer, and the facts its exchange hears;
- :mod:`~tproxy.pipeline.cachewriter`: the answer collected for the store;
- :mod:`~tproxy.pipeline.exchanger`: the glue: flights by cache key, clients' departures.
"""

from tproxy.pipeline.cachewriter import REPLAYED_HEADERS
from tproxy.pipeline.clientwriter import send_error
from tproxy.pipeline.exchanger import Exchanger, open_exchanger
from tproxy.pipeline.request import CachePlan, CacheReport, ProxyRequest

__all__ = [
    "REPLAYED_HEADERS",
    "CachePlan",
    "CacheReport",
    "Exchanger",
    "ProxyRequest",
    "open_exchanger",
    "send_error",
]
