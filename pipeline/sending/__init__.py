"""Sending: one request's attempts, the retry-wait rule, pacing, rate buckets and the worker pool.

The modules, from the policy up: ``pacing`` (the closed loop: rates, in-flight cap, timeouts; pure),
``rates`` and ``inflight`` (its parts), ``breaker`` (outages and setup errors; pure), ``retries`` (the one
wait rule between tries), ``buckets`` (request and token buckets), ``shared_limits`` (buckets held by
several processes), ``attempts`` (one row's request, all its tries) and ``pool`` (the workers feeding it).
Every module that waits takes its clock and sleep as parameters.
"""
