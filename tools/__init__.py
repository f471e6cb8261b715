"""Tools beside the package and its benchmark: the ahead-of-time compile report
(``python -m tools.compile_report``), the modelled chunk size of ``fused_linear_gkl``
(``python -m tools.chunk_model``), the H100 model of the benchmark's modelled step and traffic
(``h100_model.py``), the results document and README summary from the benchmark's JSON
(``python -m tools.readme``), and the prepared GPU check (``gpu_check.sh``, ``gpu_tests.py``)."""
