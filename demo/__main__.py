"""`python -m demo`: writes the demo model (see `demo.checkpoint`)."""

from demo.checkpoint import main

main()
