"""Tables in and out. The input is read by one checking pass, then streamed (``reader``: ``open_input``,
``read_frames``, ``read_rows``), its formats in ``delimited`` (CSV/TSV), ``jsonl_input`` and
``parquet_input``, its bytes (digest, decompression, replay) in ``input_bytes``, its table in
``input_table``, its ids in ``ids``. The output is written atomically from the ledger (``writer``), read
back for ``show``/``plan`` (``output_tables``), written as OpenAI Batch lines (``batch_output``), and
objects are fetched and uploaded (``storage``).
"""
