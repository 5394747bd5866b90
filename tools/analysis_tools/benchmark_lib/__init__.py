"""The modules of ``tools/analysis_tools/benchmark.py``: the workloads
(:mod:`.workloads`), the exact counters (:mod:`.counters`), the measuring
loops (:mod:`.measure`) and the report (:mod:`.report`)."""
