"""Configs: `default.get_config()` is the base every experiment starts from, and the schema.

`diffdyn.config.validate` rejects any key that `default.py` does not define, and any value
whose type differs from the default's. Each experiment (e1 ... e7c, e5e6_sweep, smoke) is a
module here that starts from `default.get_config()` and overrides only what differs, so that an
installed diffdyn has them; `experiments/*.py` re-export them for `launch.py --config`.
"""
