"""Configuration: the settings model, its TOML and environment sources, the
cross-field checks and :func:`pipeline.config.load.load_settings`.
"""
