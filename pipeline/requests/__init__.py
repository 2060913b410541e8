"""Requests built from rows: templates rendered into chat bodies with one canonical hash (``prompts``,
``templates``), whole conversations (``conversations``), images and videos (``media``), functions
(``tools``), schemas a grammar-constrained server can enforce (``grammar``), and ``prepare``: everything
that can be known before the first request, checked in one place.
"""
