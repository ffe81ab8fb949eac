"""The whole loop behind ``hisam run``: stages (``stages``), what is measured while it runs
(``probes``), the report (``report``), wired in order by ``loop.run_loop``."""
