"""Reproducing the paper: plan, execute, statistics, report (``aftrec reproduce``)."""
