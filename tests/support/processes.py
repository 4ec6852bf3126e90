"""Flags for the real processes the integration tests start on this one small host.

Why one torch thread each where sessions overlap: the agent and the edge share the host's cores
here (in a deployment they do not). Each keeps an OpenMP team that spin-waits for work; once both
processes compute at the same time (concurrent sessions at a split 0 < k < N), the spinning teams
take each other's cores and every forward waits on the OS scheduler: concurrent split-15
generations slow down by an order of magnitude (docs/troubleshooting.md). A single stream
alternates between the two processes and keeps the default."""

ONE_THREAD = ("--torch-threads", "1")
