"""What persists between runs of a job: the ledger of paid answers (``ledger``, ``shard_ledger``, ``runs_log``,
``seen_hashes``), the job's lock (``job_lock``), whether the output is up to date (``uptodate``), which rows
changed (``incremental``, ``patching``), and the run's one decision: ``UpToDate``, ``Patch`` or ``Full``
(``decision``).
"""
