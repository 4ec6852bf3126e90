"""The parts of benchmarks/hostile_load.py (the entry point, which documents the benchmark).

Imported as `hostile.<module>`, like `_common`: benchmarks/ is first on sys.path when a script there
runs, and the attacker's process (multiprocessing, spawn) gets the parent's sys.path, so it finds
`hostile.attacker.attacker_main` too.

- common: the scenario's constants, bearer metadata, the edge's RSS, percentiles
- payloads: the attacker's maximal Opens and poison frames
- attacker: the attacker process (silent, Open-only, flood and poison streams) and its Tally
- honest: the honest sessions through the real device Engine, and the device's counters
- watch: health / Describe / RSS polling and the edge's /metrics and /v1/sessions
- report: ITL stats, the JSON, the table and PASS/FAIL lines, the PNG
"""
