"""CLI subcommands: each module exposes `register(subparsers)`, adding a parser whose `func(args)` runs it."""
