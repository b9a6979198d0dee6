"""Tooling around the benchmarks, apart from them: precompiling the headline's kernels
(``precompile``), a call of every kernel family for compute-sanitizer (``sanitize_calls``),
plots (``plot``), the headline's one-page summary (``headline_summary``, ``junit_summary``),
and taking GPU results into the repository (``collect_results``, ``render_readme``).

Imports, one rule for every script under bench/ (benchmark or tool) and for the tests:
bench/ is the import root. A script puts bench/ first on ``sys.path`` and imports the
benchmarks and their plumbing by name (``common``, ``tables``, ``bench_layer``) and a tool
as ``tools.NAME``; pytest puts bench/ there through pyproject's ``pythonpath``. Tools may
use the benchmarks; of the benchmarks' plumbing only ``common`` uses a tool (``tools.plot``,
to draw a result's plot).

    python bench/tools/NAME.py ...
"""
