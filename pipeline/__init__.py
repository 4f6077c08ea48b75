"""Building blocks of mflag: readers, models, losses, metrics. Imports nothing from stages/ or cli."""

__version__ = "0.1.0"
