"""Where fedsim's shipped files are: the Hydra configuration (`conf/` in the repository, the package data
`fedsim.conf` once installed), found through importlib.resources so the same code runs from a checkout, an
editable install and a wheel.

Core layer: imports nothing of fedsim but the package itself (whose import maps the checkout's folders).
"""

from __future__ import annotations

from importlib.resources import files

CONF_PACKAGE = "fedsim.conf"
CONF_DIR = str(files(CONF_PACKAGE))   # an absolute directory (Hydra's config_dir)
