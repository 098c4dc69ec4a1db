"""`tomllib`, from the standard library (Python 3.11+) or its backport `tomli` (3.10): import it from here."""
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

__all__ = ["tomllib"]
