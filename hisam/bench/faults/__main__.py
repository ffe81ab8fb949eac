"""``python -m hisam.bench.faults``: the benchmark without the CLI registry."""

import hisam.bench.faults as bench
from hisam.cli import run_standalone

run_standalone("hisam bench faults", bench.__doc__, bench.add_arguments, bench.main)
