"""The ``blens`` command line."""
