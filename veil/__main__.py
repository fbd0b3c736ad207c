"""``python -m veil`` is the ``veil`` command."""

from veil.cli import main

raise SystemExit(main())
