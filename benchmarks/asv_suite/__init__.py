"""asv's benchmark folder (``benchmark_dir`` in asv.conf.json): the generated claim suite, nothing else.

asv imports every module under this folder and collects each name that starts with ``time_``,
``timeraw_``, ``track_``, ``mem_`` or ``peakmem_``. The workloads live in ``benchmarks/workloads``,
outside this folder, so none of them is taken for a benchmark; tests/test_asv_suite.py fails on any
collected name that is not a claim.
"""
