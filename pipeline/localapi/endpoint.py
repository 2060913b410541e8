"""Where a run sends: the job's server, or the built-in local API standing in for it.

A job on the ``local`` preset without a ``base_url`` is answered by the built-in API on this machine
only: in this process through a transport (no web server to start), or, for Ray, whose workers are other
processes, by a server on 127.0.0.1 that lives as long as the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from pipeline.job.spec import JobSpec
from pipeline.options import RunOptions


@contextmanager
def endpoint_for(spec: JobSpec, options: RunOptions) -> Iterator[tuple[str, RunOptions]]:
    """(base URL, the options to send with): the job's own, or the built-in API's for the run's length."""
    if spec.base_url is not None:
        yield spec.base_url, options
        return
    from pipeline.localapi import KNOWN_MODELS, ServerConfig

    # It stands in for the job's own server (``--endpoint local`` dry-runs an OpenAI job), so it serves the
    # job's model too; a LocalAPI on a base_url serves only the models it was given.
    models = tuple(dict.fromkeys((*KNOWN_MODELS, spec.model.name)))
    config = ServerConfig(
        latency_ms=spec.endpoint.local_latency_ms,
        models=models,
        field_error_rates=dict(spec.endpoint.local_error_rates),
    )
    if spec.executor.kind == "ray":
        from pipeline.localapi import LocalAPI

        server = LocalAPI(config)
        try:
            yield server.start(), options
        finally:
            server.stop()
        return
    from pipeline.localapi.inprocess import BASE_URL, InProcessTransport

    # A caller that brought its own transport keeps it.
    yield BASE_URL, options if options.transport is not None else replace(options, transport=InProcessTransport(config))
