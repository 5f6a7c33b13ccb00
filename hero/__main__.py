"""``python -m hero <command> ...`` (same as the ``hero`` script)."""
import sys

from hero.cli import main

sys.exit(main())
