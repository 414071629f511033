"""``python -m dopy``: what DOPY is and its commands; see ``dopy.cli.main``."""
from .cli import main, run
run(main)
