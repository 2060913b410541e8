"""Evaluation against right answers ("gold"): metrics per output field, terminal tables, an HTML report.

``settings`` is the job's ``[evaluation]`` section; ``gold`` reads the output and the right answers and
pairs them; ``metrics`` are pure functions; ``evaluate`` ties them into one JSON-ready document;
``tables`` prints it; ``report`` draws it (matplotlib, imported only there).
"""
