"""`python -m inferaligner.cli`."""

from inferaligner.cli import main

raise SystemExit(main())
