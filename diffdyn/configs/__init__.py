"""Configs: `default.get_config()` is the base every experiment starts from, and the schema.

`diffdyn.config.validate` rejects any key that `default.py` does not define, and any value
whose type differs from the default's. Experiment files (`experiments/*.py`) start from
`default.get_config()` and override only what differs.
"""
