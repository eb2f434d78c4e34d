"""bus benchmarks (installed as ``bus_benchmarks``): the BUS training speedup, FLOPs, scaling with
resolution, and per-kernel speed / memory traffic. Each writes JSON plus a Markdown table (and a PNG
plot where it helps); ``bus bench <name> --help`` lists the options. One shared harness:
``harness.py``."""
