"""Studies built on fedsim runs: sweep expansion, tracking, the README demo table and the course labs (labs/).

Layer: studies and reports, above the runtimes and the federation; the library (fedsim.report, fedsim.page,
fedsim.plots) never imports it.
"""
