"""Studies built on fedsim runs: sweep expansion, plots, the report page, tracking, and the course labs (labs/)."""
