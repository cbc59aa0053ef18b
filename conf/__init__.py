"""fedsim's Hydra configuration (YAML only), shipped in the wheel as the package data `fedsim.conf`; locate it with
`fedsim.paths.CONF_DIR` (importlib.resources), never by a path relative to a source file."""
