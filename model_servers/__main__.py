"""`python -m model_servers`: the same as the `model-server` command."""

from model_servers.cli import main

raise SystemExit(main())
