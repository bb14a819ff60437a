"""dfx: efficient vision transformers for dense prediction.

The command line (`dfx train|eval|bench|...`) is a thin layer over this package;
every command calls one function that can be used from Python directly.
"""

__version__ = "0.1.0"
