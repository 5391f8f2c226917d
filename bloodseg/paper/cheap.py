"""Kept for the commands stored in older records (``python -m bloodseg.paper.cheap record-bench|
record-blocks|record-solvers``), which run ``bloodseg record cheap-bench|cheap-blocks|cheap-solvers``.

The chapter "Making ODE-blocks cheap" is :mod:`bloodseg.paper.speed` (the side-by-side bench),
:mod:`bloodseg.paper.blocks` (what the blocks learned), :mod:`bloodseg.paper.solvers` (the solver
experiment), :mod:`bloodseg.paper.units` (what they share) and :mod:`bloodseg.paper.figures_speed`.
"""

if __name__ == "__main__":
    import runpy
    import sys
    sys.argv = ["bloodseg", "record", "cheap-" + sys.argv[1].removeprefix("record-"), *sys.argv[2:]]
    runpy.run_module("bloodseg.cli", run_name="__main__")
