"""The one place the version lives; packaging and --version read it."""

__version__ = "0.1.0"
