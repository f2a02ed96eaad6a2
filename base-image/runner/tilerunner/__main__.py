"""`python -m tilerunner` is the same as the `tilerunner` console script."""

from tilerunner.cli import main

raise SystemExit(main())
