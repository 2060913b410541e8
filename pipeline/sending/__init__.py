"""Sending: one request's attempts, the retry-wait rule, pacing, rate buckets and the worker pool.

The modules, from the policy up: ``pacing`` (the closed loop: rates, in-flight cap, timeouts; pure),
``rates`` and ``inflight`` (its parts), ``breaker`` (outages and setup errors; pure), ``retries`` (the one
wait rule between tries), ``buckets`` (request and token buckets), ``shared_limits`` (buckets held by
several processes), ``budget`` (the spending limit), ``client`` (one HTTP request, its failures on the error
tree; ``connection_causes`` words them, ``sse`` reads a streamed answer), ``attempts`` (one row's request,
all its tries) and ``pool`` (the workers feeding it). Every module that waits on a schedule takes its clock
and sleep as parameters; only the watch on a request or stream in flight (``sse.wait_until``) reads the
monotonic clock, since what it waits for is the network.
"""
