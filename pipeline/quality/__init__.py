"""Label quality: a job run in stages (``voting``: k samples per row, their majority, the doubtful rows sent
again with a stronger setting), and evaluation against right answers (``gold`` pairs them, ``metrics`` are
pure, ``evaluate`` builds the document, ``terminal`` prints it, ``report`` draws it with matplotlib).
"""
