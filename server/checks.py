"""Checks of a whole run's config (being moved here from configs/)."""

from iiotfl.configs import ConfigError, validate  # noqa: F401
