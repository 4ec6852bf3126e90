"""Tooling around the library, not part of it: starting the apps as processes (launcher), a link
shaper and the nginx / HAProxy fronts for tests and benchmarks (shaper, proxies), the container
health probe (`python -m coinfer.tools.healthcheck`) and the `coinfer plan` what-if (whatif).

Why apart: the apps and the library never import these; a reader looking for what runs in a
request can skip this package.
"""
