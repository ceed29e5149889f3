"""``python -m streamflow`` runs the command line."""

from streamflow.cli_root import main

main()
