import sys

from lightning_distill.cli import main

sys.exit(main())
