"""``python -m hisam.bench.gpu`` (scripts/gpu_check.sh): plain logging, so that not even the CLI's imports are needed."""

import argparse
import logging
import sys

from hisam.bench.gpu import __doc__ as doc
from hisam.bench.gpu import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m hisam.bench.gpu", description=doc.splitlines()[0])
add_arguments(parser)
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
sys.exit(main(parser.parse_args()))
