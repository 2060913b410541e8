"""Answers: what one answer is (``record``: its fields, dtypes and ``Outcome`` attributes, defined once),
how it is judged (``validator``), what it cost (``costs``), and how a row's samples are voted on (``votes``).
Pure: no I/O.
"""
