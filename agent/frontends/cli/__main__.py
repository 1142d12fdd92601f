"""``python -m agent.frontends.cli``: the ``imgrag`` command without the installed entry point."""

from agent.frontends.cli.app import main

main()
