"""Reproductions of the paper's experiments, run by the ``mcgrad`` command."""
