"""``python -m gradgate``: the command line (the same as the ``gradgate`` script)."""

from gradgate.tools.cli import main

raise SystemExit(main())
