"""The job: a TOML file loaded into one strict, typed ``JobSpec``, checked before anything is read or sent.

``spec`` (the ``JobSpec`` and its loader), ``sections`` (the file's sections, a docstring per key),
``stages`` (``[votes]`` and ``[escalation]``), ``evaluation`` (``[evaluation]``: where the right answers
are), ``schema_types``/``schema_checks`` (the output schema: checked at load, compiled to typed columns),
``objects`` (where an ``s3://`` input or output has its local copy).
"""
