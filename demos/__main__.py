"""``python -m demos``: run the demos; see ``demos/_runner.py``."""

from demos._runner import main

raise SystemExit(main())
