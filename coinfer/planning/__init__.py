"""Planning a split: cost profiles, the link model and the partitioner, as plain numbers.

Why a package of its own in the shared library: the device agent plans every request with it,
and `coinfer plan` and the benchmarks ask it the same question offline; none of them should
have to import an app, load torch or open a socket to price a cut. Measuring a profile
(coinfer/profile.py) and feeding the estimates live (device_agent/planning.py) live elsewhere.
"""
