"""Run the command line as `python -m audience_sync`."""

from audience_sync.cli import main

main()
