"""Tables in and out: the input read in one checking pass then streamed (``reader``, ``ids``), the output
written atomically from the ledger (``writer``), read back for ``show``/``plan`` (``output_tables``), as
OpenAI Batch lines (``batch_output``), and objects fetched and uploaded (``storage``).
"""
