"""The command line: ``boshroster serve`` and ``boshroster user ...``."""
