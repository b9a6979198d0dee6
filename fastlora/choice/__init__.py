"""Which implementation runs a layer call: the backends (``backend``), the chooser that times
the fused kernels against cuBLAS plus a small GEMM per shape (``dispatch``), the file that
keeps its choices (``store``), ``warmup`` / ``explain``, and the launch plans a layer keeps
so a steady-state call is a key lookup plus the launches (``plans``)."""
