"""ray-twist: TWIST (reusing transferable weight increments for style generation) on Ray."""

__version__ = "0.1.0"
