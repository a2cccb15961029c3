"""One module per `orthosae` sub-command. Each exposes `register(subparsers)`; cli.py lists them."""
