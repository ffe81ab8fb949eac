"""``python -m hisam.bench.stream``: the benchmark without the CLI registry."""

import hisam.bench.stream as bench
from hisam.cli import run_standalone

run_standalone("hisam bench stream", bench.__doc__, bench.add_arguments, bench.main)
